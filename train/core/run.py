"""A run's parts, as ``train.core.setup.setup`` built them: a frozen value (``Run``) with the
jitted programs (``Programs``) and the router probe (``Probe``). Its methods compute from its parts
and the training state passed in; none keeps state of its own."""

from __future__ import annotations

import dataclasses
import pathlib
import time
from typing import Any, Callable

import jax
import numpy as np
import optax

from sharding.rules import mesh_and_rules
from train.core.checkpoint import Checkpoints
from train.core.config import Config
from train.core.step import TrainState, score
from train.data.batches import TrainBatches, eval_batches
from train.data.prepared import RunData
from train.services import metrics as metrics_lib
from train.services.telemetry import RoutingProbe
from train.services.workdir import RunFolder


@dataclasses.dataclass(frozen=True)
class Programs:
    """The jitted programs of a run and the shardings they were compiled for."""

    graphdef: Any  # the training model's
    eval_graphdef: Any
    state_shardings: TrainState  # of NamedShardings
    spread: Any  # the optimizer moments' PartitionSpecs when ``optimizer.sharded_state``, else None
    batch_sharding: jax.sharding.NamedSharding
    train_step: Callable  # (state, batch, stop) -> (state, metrics); the state is donated
    eval_step: Callable  # (params, model_state, batch) -> sums
    stop: tuple[jax.Array, jax.Array]  # the [B, 1] stop input: (nobody asks, this process asks)


@dataclasses.dataclass(frozen=True)
class Probe:
    """The router telemetry's fixed batch (the first validation batch) and its compiled dispatch."""

    telemetry: RoutingProbe
    inputs: jax.Array
    step: Callable  # (params, model_state, inputs) -> {"layer<i>": [B, S] device ids}


@dataclasses.dataclass(frozen=True)
class Run:
    """The parts of a run, as ``setup`` built them (see the module docstring)."""

    cfg: Config  # resolved: the data settings in force, the vocabulary, this backend's choices
    saved_cfg: Config  # what config.json and the checkpoints record
    meta: dict  # a checkpoint's metadata: the saved config and the data fingerprint
    workdir: pathlib.Path
    proc: int
    nproc: int
    devices: tuple
    mesh: jax.sharding.Mesh
    folder: RunFolder | None  # the locked run folder (process 0)
    writer: metrics_lib.MetricsWriter
    log: Callable[[str], None]
    data: RunData
    batches: TrainBatches  # this process's rows of each step, in order; its position is checkpointed
    tx: optax.GradientTransformation
    schedule: Callable
    checkpoints: Checkpoints
    programs: Programs
    probe: Probe | None  # None: no router telemetry for this model
    step_memory: Any  # the pre-flight estimate of one step (``train.services.memory``)

    @property
    def tokenizer(self):
        return self.data.tokenizer

    def context(self):
        """The mesh and sharding rules every traced function runs under."""
        return mesh_and_rules(self.mesh, self.cfg.mesh.rules)

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble each process's rows into global arrays sharded over the batch axes."""
        b = self.cfg.train.batch_size
        return {
            k: jax.make_array_from_process_local_data(self.programs.batch_sharding, v, (b, *v.shape[1:]))
            for k, v in local.items()
        }

    def train_step(self, state: TrainState, batch, stop: bool | jax.Array = False):
        """One jitted training step ``-> (state, metrics)``; ``stop``: this process asks to stop (or the
        [B, 1] flags themselves)."""
        if not isinstance(stop, jax.Array):
            stop = self.programs.stop[bool(stop)]
        return self.programs.train_step(state, batch, stop)

    def evaluate(self, state: TrainState) -> dict[str, float]:
        """The validation split's loss, bits per byte and perplexity (``train.eval_batches`` batches)."""
        t = self.cfg.train
        batches = eval_batches(self.data.validation.tokens, t.seq_len, t.batch_size, self.cfg.eval_batches,
                               self.proc, self.nproc)
        with self.context():
            return score(self.programs.eval_step, state.params, state.model_state, batches, self.global_batch,
                         self.data.validation.num_bytes, len(self.data.validation.tokens))

    def routing_probe(self, state: TrainState):
        """Dispatch the probe on ``state``: {"layer<i>": [B,S] device ids}, or None (no probe)."""
        if self.probe is None:
            return None
        return self.probe.step(state.params, state.model_state, self.probe.inputs)

    def save_checkpoint(self, state: TrainState, step: int, *, force: bool = False) -> float:
        """Start an asynchronous save; the caller is blocked only for the device-to-host copy (returned, ms)."""
        start = time.perf_counter()
        self.checkpoints.save(step, state, self.batches.get_state(), self.meta, force=force)
        blocked_ms = 1e3 * (time.perf_counter() - start)
        self.log(f"checkpoint {step}: saving in the background (blocked {blocked_ms:.0f} ms)")
        return blocked_ms

    def close(self, abandon: bool = False) -> None:
        """Wait for a save in flight and close the logs; ``abandon`` (a run that stopped before its
        first step) also removes what this run added to the workdir."""
        self.checkpoints.close()  # waits for a save in flight
        self.writer.close()
        if self.folder is not None:
            if abandon:
                self.folder.abandon()
            self.folder.release()
