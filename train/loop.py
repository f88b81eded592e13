"""The training recipe: config -> mesh -> data -> sharded state -> jitted steps -> logs, checkpoints.

The loop never waits on the step it just dispatched: after dispatching step N it reads step
N-1's metrics, so host work overlaps device work.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe.routing import balanced_table
from moe.transformer import Transformer
from sharding.distributed import Watchdog
from sharding.mesh import make_mesh
from sharding.rules import logical_to_spec, mesh_and_rules
from train import metrics as metrics_lib
from train.checkpoint import CheckpointError, Checkpoints
from train.config import Config, ConfigError, check_compatible, validate, validate_mesh
from train.batches import TrainBatches, eval_batches
from train.data import corpus_texts, data_fingerprint, load_corpus
from train.evaluate import score
from train.memory import check_fits, step_memory
from train.optimizer import make_optimizer
from train.profiler import StepProfiler
from train.signals import StopSignals
from train.workdir import RunFolder, WorkdirError
from train.step import TrainState, make_eval_step, make_train_step, shardings_of, split_model
from train.tokenizer import build_tokenizer


def resolve_model(cfg: Config, vocab_size: int) -> Config:
    """The config with the model's vocabulary filled in from the tokenizer (rounded up to 64)."""
    if cfg.model.vocab_size:
        if cfg.model.vocab_size < vocab_size:
            raise ConfigError(f"config.model.vocab_size={cfg.model.vocab_size}: the tokenizer needs {vocab_size}")
        return cfg
    model = dataclasses.replace(cfg.model, vocab_size=-(-vocab_size // 64) * 64)
    return dataclasses.replace(cfg, model=model)


def write_json_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def param_counts(model_cfg) -> dict[str, int]:
    """Total and active (per token) parameter counts, from abstract shapes only."""
    abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    total = expert = 0
    for path, leaf in jax.tree.leaves_with_path(nnx.state(abstract, nnx.Param)):
        n = math.prod(leaf.shape)
        total += n
        keys = [getattr(p, "key", None) for p in path]
        if "ffn" in keys and leaf.ndim == 3:  # expert weights [E, ., .]
            expert += n
    e, k = model_cfg.num_experts, model_cfg.experts_per_token
    active = total - (expert * (e - k) // e if expert else 0)
    return {"total": total, "active": active, "expert": expert}


def flops_per_token(cfg: Config) -> float:
    m = cfg.model
    moe_layers = sum(1 for i in range(m.num_layers) if m.is_moe_block(i))
    return metrics_lib.transformer_flops_per_token(
        num_layers=m.num_layers, d_model=m.d_model, num_heads=m.num_heads, seq_len=cfg.train.seq_len,
        vocab_size=m.vocab_size, d_ff=m.d_ff, moe_layers=moe_layers, expert_d_ff=m.expert_d_ff or m.d_ff,
        experts_per_token=m.experts_per_token, gated=m.gated, num_experts=m.num_experts,
    )


class NonFiniteError(RuntimeError):
    """Training stopped after too many consecutive non-finite steps (the message names the step)."""


def _take_run_folder(workdir: pathlib.Path, proc: int, nproc: int) -> RunFolder | None:
    """Process 0 creates and locks the workdir; every process learns whether it could."""
    folder, error = None, None
    if proc == 0:
        try:
            folder = RunFolder(workdir).open()
        except WorkdirError as e:
            error = e
    if nproc > 1:
        from jax.experimental import multihost_utils

        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            error = WorkdirError(f"--workdir={workdir}: process 0 could not take it (see its message)")
    if error is not None:
        raise error
    return folder


class Trainer:
    """Everything one run needs, built in order; ``run()`` trains."""

    def __init__(
        self,
        cfg: Config,
        workdir: str | pathlib.Path,
        *,
        devices=None,
        log: Callable[[str], None] | None = None,
        memory_check: bool = True,
    ):
        """``memory_check``: refuse a step that cannot fit the devices (``train.memory``) before
        allocating the state."""
        validate(cfg)
        self.memory_check = memory_check
        self.workdir = pathlib.Path(workdir)
        self.proc, self.nproc = jax.process_index(), jax.process_count()
        self.devices = list(jax.devices() if devices is None else devices)
        self.sizes = sizes = validate_mesh(cfg, len(self.devices))
        self.steps_done = 0  # training steps this Trainer has finished
        self.folder = self.writer = self.checkpoints = None
        self.folder = _take_run_folder(self.workdir, self.proc, self.nproc)
        try:
            self._build(cfg, sizes, log)
        except BaseException:
            self._abandon()  # the workdir as it was found
            raise

    def _abandon(self) -> None:
        for part in (self.checkpoints, self.writer):
            if part is not None:
                try:
                    part.close()
                except Exception:  # noqa: BLE001 - already failing; the first error is the report
                    pass
        if self.folder is not None:
            self.folder.abandon()

    def _build(self, cfg: Config, sizes: dict[str, int], log) -> None:
        self.writer = metrics_lib.MetricsWriter(self.workdir, total_steps=cfg.train.steps, enabled=self.proc == 0)
        self.log = log or self.writer.log
        self.tokenizer = build_tokenizer(cfg.data, self.workdir, lambda: corpus_texts(cfg.data, "train"))
        self.cfg = cfg = resolve_model(cfg, self.tokenizer.vocab_size)
        self.train_corpus = load_corpus(cfg.data, self.tokenizer, "train")
        self.val_corpus = load_corpus(cfg.data, self.tokenizer, "validation")
        t = cfg.train
        self.batches = TrainBatches(self.train_corpus.tokens, t.seq_len, t.batch_size, t.seed, self.proc, self.nproc)
        self.mesh = make_mesh(devices=self.devices, **sizes)
        self.tx, self.schedule = make_optimizer(cfg.optimizer, t.steps)
        self.meta = {"config": cfg.to_dict(), "data_fingerprint": data_fingerprint(cfg.data)}
        self.checkpoints = Checkpoints(self.workdir / "checkpoints", keep=cfg.checkpoint.keep)
        self.save_blocking_ms: list[float] = []
        self._check_checkpoint_config()  # before any compile: an incompatible workdir is refused at once
        with self.context():
            self._init_state()
            self._install_hash_tables()
            self._compile()
            self._check_process_rows()
            self._maybe_resume()
        if self.proc == 0:  # only once the checkpoints (if any) are known to match it
            write_json_atomic(self.workdir / "config.json", cfg.to_json())

    def context(self):
        """The mesh and sharding rules every traced function runs under."""
        return mesh_and_rules(self.mesh, self.cfg.mesh.rules)

    # ---------------------------------------------------------------- state
    def _init_state(self):
        cfg = self.cfg
        seed = cfg.train.seed

        def build():
            return Transformer(cfg.model, rngs=nnx.Rngs(params=seed, routing=seed + 1))

        abstract_model = nnx.eval_shape(build)
        self.graphdef, _, _ = split_model(abstract_model)
        abstract_model.eval()
        self.eval_graphdef, _, _ = split_model(abstract_model)

        def init():
            _, params, rest = split_model(build())
            window = jnp.full((cfg.train.spike_window,), jnp.nan, jnp.float32)
            return TrainState(jnp.zeros((), jnp.int32), params, self.tx.init(params), rest, window)

        abstract = jax.eval_shape(init)
        shards = self.sizes["data"] * self.sizes["fsdp"] * self.sizes["expert"]
        self.step_memory = step_memory(cfg, abstract, shards, self.sizes["tensor"])
        if self.memory_check:  # before anything is allocated
            check_fits(cfg, self.step_memory, self.devices)
        abstract_shardings = shardings_of(abstract)
        self.state = jax.jit(init, out_shardings=abstract_shardings)()  # parameters born sharded
        self.state_shardings = shardings_of(self.state)

    def _install_hash_tables(self) -> None:
        """balanced_hash: every MoE layer's token -> expert table, balanced on the training split's
        token frequencies (a resumed run then restores the saved one, which is the same)."""
        m = self.cfg.model
        if m.router != "balanced_hash":
            return
        counts = np.bincount(self.train_corpus.tokens, minlength=m.vocab_size)[: m.vocab_size]
        table = balanced_table(counts, m.num_experts, m.experts_per_token, m.hash_seed)

        def put(path, leaf):
            if "hash_table" not in jax.tree_util.keystr(path):
                return leaf
            return jax.device_put(table.astype(leaf.dtype), leaf.sharding)

        self.state = dataclasses.replace(self.state, model_state=jax.tree_util.tree_map_with_path(put, self.state.model_state))
        self.log(f"balanced_hash: token -> expert table from {len(self.train_corpus.tokens):,} training tokens")

    def _check_checkpoint_config(self) -> None:
        step = self.checkpoints.latest_step()
        if step is not None:
            try:
                meta, _ = self.checkpoints.read_meta(step)
            except Exception:  # noqa: BLE001 - an unreadable step is handled by _maybe_resume
                return
            check_compatible(self.meta, meta, self.checkpoints.directory / str(step))

    def _maybe_resume(self):
        """Continue from the latest checkpoint that restores; set unreadable ones aside, naming them."""
        for step in reversed(self.checkpoints.all_steps()):
            where = self.checkpoints.directory / str(step)
            try:
                meta, data_state = self.checkpoints.read_meta(step)
                check_compatible(self.meta, meta, where)
                state = self.checkpoints.restore(step, self.state, self.state_shardings)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - truncated or missing files: fall back
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                moved = self.checkpoints.set_aside(step)
                self.log(f"checkpoint {step} at {where} cannot be restored ({reason}); kept as {moved.name}, trying an older one")
                continue
            self.state = state
            self.batches.set_state(data_state)
            self.log(f"resumed from {where}")
            return
        if self.checkpoints.set_aside_steps():
            raise CheckpointError(
                f"{self.checkpoints.directory}: no checkpoint can be restored (set aside: "
                f"{', '.join(self.checkpoints.set_aside_steps())}); move them away to start afresh"
            )

    def save_checkpoint(self, step: int, *, force: bool = False) -> None:
        """Start an asynchronous save; the loop is blocked only for the device-to-host copy."""
        start = time.perf_counter()
        self.checkpoints.save(step, self.state, self.batches.get_state(), self.meta, force=force)
        blocked_ms = 1e3 * (time.perf_counter() - start)
        self.save_blocking_ms.append(blocked_ms)
        self.log(f"checkpoint {step}: saving in the background (blocked {blocked_ms:.0f} ms)")

    def _compile(self):
        cfg = self.cfg
        self.batch_spec = logical_to_spec(("batch", "seq"), self.mesh)
        self.batch_sharding = jax.sharding.NamedSharding(self.mesh, self.batch_spec)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.P())
        step = make_train_step(
            self.graphdef, self.tx, self.schedule, cfg.train.grad_accum_steps, cfg.train.spike_sigma
        )
        self.train_step = jax.jit(
            step,
            in_shardings=(self.state_shardings, self.batch_sharding),
            out_shardings=(self.state_shardings, replicated),
            donate_argnums=0,
        )
        self.eval_step = jax.jit(
            make_eval_step(self.eval_graphdef),
            in_shardings=(self.state_shardings.params, self.state_shardings.model_state, self.batch_sharding),
            out_shardings=replicated,
        )

    def _check_process_rows(self) -> None:
        """Each process reads the p-th contiguous block of rows: the mesh must place it there."""
        b, s = self.cfg.train.batch_size, self.cfg.train.seq_len
        starts, stops = set(), set()
        for index in self.batch_sharding.addressable_devices_indices_map((b, s)).values():
            starts.add(index[0].start or 0)
            stops.add(b if index[0].stop is None else index[0].stop)
        local = b // self.nproc
        if (min(starts), max(stops)) != (self.proc * local, (self.proc + 1) * local):
            raise ConfigError(
                f"config.mesh: process {self.proc} holds batch rows {min(starts)}..{max(stops)}, not its own "
                f"contiguous block {self.proc * local}..{(self.proc + 1) * local}; order the mesh so that each "
                "process's devices are adjacent on the batch axes"
            )

    def global_batch(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assemble each process's rows into global arrays sharded over the batch axes."""
        b = self.cfg.train.batch_size
        return {
            k: jax.make_array_from_process_local_data(self.batch_sharding, v, (b, *v.shape[1:]))
            for k, v in local.items()
        }

    # ---------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        batches = eval_batches(
            self.val_corpus.tokens, cfg.train.seq_len, cfg.train.batch_size, cfg.eval_batches, self.proc, self.nproc
        )
        with self.context():
            return score(self.eval_step, self.state.params, self.state.model_state, batches, self.global_batch, self.val_corpus)

    # ---------------------------------------------------------------- training
    def run(self, stop_at: int | None = None, signals: StopSignals | None = None) -> dict:
        """Train to ``train.steps`` (or stop after step ``stop_at``, checkpointed, as an interruption would).

        SIGTERM (preemption) or Ctrl-C (``signals``, installed here unless given) stops at the next
        step boundary: a checkpoint of the current step is saved (unless no step was taken since the
        last one), waited for, and the summary says ``preempted`` (the step) and ``stopped_by``. A
        signal to any process stops all of them after the same step (the flag travels with the
        batch and is reduced in the step). ``train.max_nonfinite_steps`` consecutive skipped
        (non-finite) updates raise ``NonFiniteError`` without a new checkpoint."""
        cfg = self.cfg
        t = cfg.train
        tokens_per_step = t.batch_size * t.seq_len
        flops = flops_per_token(cfg)
        peak = cfg.peak_flops_per_device or metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind, cfg.model.dtype)
        start_step = int(self.state.step)
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        summary: dict = {"first_loss": None, "last_loss": None, "tokens_per_sec": None, "skipped_steps": 0}
        pending = None  # (step, device metrics) of the step dispatched last
        window_start, window_tokens = None, 0
        rates = []
        nonfinite_run = 0
        timeout = t.step_timeout_s or (900.0 if self.nproc > 1 else 0.0)
        watchdog = Watchdog(timeout)
        profiler = StepProfiler(self.workdir / "profile", cfg.profile_steps, enabled=self.proc == 0, log=self.log)

        def consume(step: int, dev_metrics) -> None:
            nonlocal window_start, window_tokens, nonfinite_run
            host = jax.device_get(dev_metrics)  # waits for that step only
            watchdog.beat(step)
            self.steps_done += 1
            now = time.perf_counter()
            loss = float(host["loss"])
            if summary["first_loss"] is None:
                summary["first_loss"] = loss
            summary["last_loss"] = loss
            if host.pop("stop", 0):  # some process got SIGTERM
                stop_requested.append(step + 1)
            skipped = bool(host["skipped"])
            summary["skipped_steps"] += int(skipped)
            nonfinite_run = nonfinite_run + 1 if host["nonfinite"] else 0
            if window_start is None:  # the first step includes compilation: start timing after it
                window_start, window_tokens = now, 0
            else:
                window_tokens += tokens_per_step
            if (step + 1) % cfg.log_every_steps == 0 or step + 1 == end or skipped:
                row = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in host.items()}
                row["tokens_per_sec"] = row["mfu"] = None  # null until a timed window exists (the first step compiles)
                if window_tokens and not skipped:
                    rate = window_tokens / (now - window_start)
                    rates.append(rate)
                    row["tokens_per_sec"] = rate
                    row["mfu"] = metrics_lib.mfu(rate, flops, len(self.devices), peak)
                    window_start, window_tokens = now, 0
                self.writer.write(step + 1, row)
            if skipped:
                what = "non-finite loss or gradient" if host["nonfinite"] else "loss spike"
                self.log(f"step {step + 1}: update skipped ({what}); parameters, optimizer and model state unchanged")
            if nonfinite_run >= t.max_nonfinite_steps:
                raise NonFiniteError(
                    f"train: step {step + 1} ends {nonfinite_run} non-finite steps in a row "
                    f"(train.max_nonfinite_steps={t.max_nonfinite_steps}); stopped without saving a checkpoint. "
                    f"The last good checkpoint is in {self.checkpoints.directory}"
                )

        stop_requested = []  # some process was signalled (read back from a step's metrics)
        own_signals = signals is None
        signals = StopSignals(self.log) if own_signals else signals
        every = cfg.checkpoint.every_steps
        try:
            with self.context():  # the watchdog arms at the first finished step: compiling is not stalling
                for step in range(start_step, end):
                    if self.nproc == 1 and signals.requested:  # alone: stop at this boundary, no step more
                        if pending is not None:
                            consume(*pending)
                            pending = None
                        return self._stop(step, start_step, signals.reason, summary)
                    local = next(self.batches)
                    batch = self.global_batch({**local, "stop": np.full((len(local["inputs"]), 1), signals.requested, np.int32)})
                    profiler.maybe_start(step + 1, warm=step > start_step, previous=self.state)  # after the compiling step
                    with profiler.annotate(step + 1):
                        self.state, dev_metrics = self.train_step(self.state, batch)
                    profiler.step_done((self.state, dev_metrics))
                    if pending is not None:
                        consume(*pending)
                    pending = (step, dev_metrics)
                    if stop_requested:  # read back from the previous step: every process stops after this one
                        consume(*pending)
                        pending = None
                        return self._stop(step + 1, start_step, signals.reason or "a signal to another process", summary)
                    if every and (step + 1) % every == 0 and step + 1 < end:
                        self.save_checkpoint(step + 1)  # asynchronous: blocks only for the device-to-host copy
                    if cfg.eval_every_steps and (step + 1) % cfg.eval_every_steps == 0 and step + 1 < t.steps:
                        consume(*pending)
                        pending = None
                        self.writer.write(step + 1, self.evaluate(), split="eval")
                        watchdog.beat(step)
                        window_start, window_tokens = time.perf_counter(), 0  # evaluation time is not training time
                profiler.stop((self.state, pending))  # fewer steps left than profile_steps
                if pending is not None:
                    consume(*pending)
                if self.checkpoints.latest_step() != end:
                    self.save_checkpoint(end, force=True)
            watchdog.beat(end - 1)
            final_eval = self.evaluate()
        finally:
            profiler.finish()  # a trace still running here (preemption, error) stops without waiting
            watchdog.stop()
            if own_signals:
                signals.restore()
        self.writer.write(end, final_eval, split="eval")
        summary["eval_loss"] = final_eval["loss"]
        summary["tokens_per_sec"] = float(np.median(rates)) if rates else None
        if rates:
            summary["step_ms"] = 1e3 * tokens_per_step / summary["tokens_per_sec"]
        if profiler.session is not None:
            summary["profile"] = str(profiler.session)
        if self.save_blocking_ms:
            summary["checkpoint_blocking_ms"] = float(np.median(self.save_blocking_ms))
        if self.proc == 0:
            write_json_atomic(self.workdir / "summary.json", json.dumps(summary, indent=2))
        return summary

    def _stop(self, step: int, start_step: int, reason: str, summary: dict) -> dict:
        """End the run at step boundary ``step``, saved (unless nothing was trained since the start)."""
        summary["preempted"], summary["stopped_by"] = step, reason
        if step == start_step:
            self.log(f"stopped ({reason}) before the first step: nothing to save")
            return summary
        self.checkpoints.wait()
        if step not in self.checkpoints.all_steps():  # not just saved on schedule
            self.save_checkpoint(step, force=True)
            self.checkpoints.wait()
        self.log(f"stopped ({reason}): checkpoint {step} saved; run the same command to resume")
        return summary

    def close(self, abandon: bool = False):
        """Wait for a save in flight and close the logs; ``abandon`` (a run that stopped before its
        first step) also removes what this run added to the workdir."""
        self.checkpoints.close()  # waits for a save in flight
        self.writer.close()
        if self.folder is not None:
            if abandon:
                self.folder.abandon()
            self.folder.release()


def sharding_table(model_cfg, mesh, rules: str) -> dict[str, tuple]:
    """Parameter path -> PartitionSpec (as a tuple) of a model built on ``mesh`` under ``rules``."""
    with mesh_and_rules(mesh, rules):
        abstract = nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0)))
    table = {}
    for path, leaf in jax.tree.leaves_with_path(nnx.state(abstract, nnx.Param)):
        name = "/".join(str(p.key) for p in path if hasattr(p, "key"))
        table[name] = tuple(leaf.sharding.spec)
    return table
