"""Everything a run needs before its first step, built in order (``TrainerSetup.__init__``):

the run folder (locked), the tokenizer and data, the mesh, the optimizer, the checkpoints, the
state (born sharded, after a memory pre-flight), routers fitted to the training split, the
jitted steps, then the latest restorable checkpoint. Anything that fails leaves the workdir as it
was found. ``train.core.loop.Trainer`` adds the training loop.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moe import layout
from moe.transformer import abstract_model, build_model
from sharding.distributed import aligned, barrier
from sharding.mesh import make_mesh
from sharding.rules import logical_to_spec, mesh_and_rules, spread_spec
from train.core.checkpoint import Checkpoints, from_nested, to_nested
from train.core.config import Config, as_asked, check_compatible, for_backend, validate, validate_mesh, with_vocab
from train.core.optimizer import make_optimizer
from train.core.step import (TrainState, loss_for, make_eval_step, make_probe_step, make_train_step, shardings_of,
                             split_model)
from train.data.batches import TrainBatches, eval_batches, split_counts
from train.data.prepared import open_run_data
from train.errors import CheckpointError, ConfigError, WorkdirError
from train.services import metrics as metrics_lib
from train.services.memory import check_fits, step_memory
from train.services.telemetry import RoutingProbe, has_probe
from train.services.workdir import RunFolder, write_text_atomic


def take_run_folder(workdir: pathlib.Path, proc: int, nproc: int) -> RunFolder | None:
    """Process 0 creates and locks the workdir; every process learns whether it could."""
    folder, error = None, None
    if proc == 0:
        try:
            folder = RunFolder(workdir).open()
        except WorkdirError as e:
            error = e
    if nproc > 1:
        from jax.experimental import multihost_utils

        barrier("workdir")  # the broadcast is the first collective: start it together
        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            error = WorkdirError(f"--workdir={workdir}: process 0 could not take it (see its message)")
    if error is not None:
        raise error
    return folder


def state_init(cfg: Config, tx):
    """(graphdef, eval-mode graphdef, whether routers fit token counts, ``init() -> TrainState``)
    for the model of ``cfg``; call under the run's mesh and rules. Nothing is allocated here.

    An unrolled model whose blocks could be scanned is initialised scanned, then unstacked: the same
    draws, and one block pattern to compile instead of every block."""
    seed = cfg.train.seed

    abstract = abstract_model(cfg.model, seed=seed)
    graphdef, like_params, like_rest = split_model(abstract)
    fits_routers = abstract.wants_token_counts
    abstract.eval()
    eval_graphdef, _, _ = split_model(abstract)
    scanned = dataclasses.replace(cfg.model, scan_layers="on")
    through_scan = cfg.model.scan_repeats == 0 and scanned.scan_repeats > 0

    def unstacked(tree, like):
        return from_nested(layout.unroll(to_nested(tree), scanned.period, scanned.first_scanned), like)

    def init():
        if through_scan:
            _, params, rest = split_model(build_model(scanned, seed))
            params, rest = unstacked(params, like_params), unstacked(rest, like_rest)
        else:
            _, params, rest = split_model(build_model(cfg.model, seed))
        window = jnp.full((cfg.train.spike_window,), jnp.nan, jnp.float32)
        return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), rest, window)

    return graphdef, eval_graphdef, fits_routers, init


def probe_graphdef(cfg: Config):
    """The eval-mode graphdef of the router probe: evaluation without drops gives every expert a slot
    for every token (E times the experts' work), so the probe keeps the training capacity (which
    experts a router chooses does not depend on capacity; only later layers' inputs move a little)."""
    cfg = copy.deepcopy(cfg)
    if not cfg.model.moe.eval_capacity_factor:
        cfg.model.moe.eval_capacity_factor = cfg.model.moe.capacity_factor
    return split_model(abstract_model(cfg.model, "eval"))[0]


def state_shardings(cfg: Config, abstract: TrainState, tx):
    """(the shardings of the train state, the PartitionSpecs of the optimizer moments as a tree like
    the parameters, or None). The moments follow their parameters unless
    ``optimizer.sharded_state``, which splits them over every mesh axis a parameter is replicated
    on as well (``sharding.rules.spread_spec``)."""
    shardings = shardings_of(abstract)
    if not cfg.optimizer.sharded_state:
        return shardings, None
    spread = jax.tree.map(lambda x, s: spread_spec(s.spec, x.shape, s.mesh), abstract.params, shardings.params)
    named = jax.tree.map(lambda s, p: jax.sharding.NamedSharding(s.mesh, p), shardings.params, spread)
    opt = optax.tree_map_params(tx, lambda _, sharding: sharding, shardings.opt_state, named,
                                transform_non_params=lambda s: s)
    return dataclasses.replace(shardings, opt_state=opt), spread


def with_shardings(abstract, shardings):
    """Abstract arrays carrying ``shardings``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def jit_train_step(cfg: Config, graphdef, tx, schedule, state_shardings, batch_sharding, spread=None):
    """The jitted training step ``(state, batch, stop) -> (state, metrics)``; the state is donated."""
    step = make_train_step(graphdef, tx, schedule, cfg.train.grad_accum_steps, cfg.train.spike_sigma,
                           loss_for(cfg.model), spread)
    replicated = jax.sharding.NamedSharding(batch_sharding.mesh, jax.P())
    return jax.jit(
        step,
        in_shardings=(state_shardings, batch_sharding, batch_sharding),
        out_shardings=(state_shardings, replicated),
        donate_argnums=0,
    )


class TrainerSetup:
    """The parts of a run, built in order; see the module docstring."""

    def __init__(
        self,
        cfg: Config,
        workdir: str | pathlib.Path,
        *,
        devices=None,
        log: Callable[[str], None] | None = None,
        memory_check: bool = True,
    ):
        """``memory_check``: refuse a step that cannot fit the devices (``train.services.memory``)
        before allocating the state."""
        validate(cfg)
        self.memory_check = memory_check
        self.workdir = pathlib.Path(workdir)
        self.proc, self.nproc = jax.process_index(), jax.process_count()
        self.devices = list(jax.devices() if devices is None else devices)
        self.sizes = validate_mesh(cfg, len(self.devices))
        self.steps_done = 0  # training steps this trainer has finished
        self.folder = self.writer = self.checkpoints = None
        self.folder = take_run_folder(self.workdir, self.proc, self.nproc)
        try:
            self._build(for_backend(copy.deepcopy(cfg), self.devices[0].platform), log, asked=cfg)
        except BaseException:
            self._abandon()  # the workdir as it was found
            raise

    def _build(self, cfg: Config, log, asked: Config) -> None:
        self.writer = metrics_lib.MetricsWriter(self.workdir, total_steps=cfg.train.steps, enabled=self.proc == 0)
        self.log = log or self.writer.log
        self._take_init_tokenizer(cfg)
        # raw text read and tokenized here, or a prepared folder memory-mapped (its settings in force)
        data = open_run_data(cfg.data, self.workdir, write=self.proc == 0, log=self.log)
        self.tokenizer, self.train_corpus, self.val_corpus = data.tokenizer, data.train, data.validation
        cfg.data = data.cfg
        self.cfg = cfg = with_vocab(cfg, self.tokenizer.vocab_size)
        t = cfg.train
        self.batches = TrainBatches(self.train_corpus.tokens, t.seq_len, t.batch_size, t.seed, self.proc, self.nproc)
        self.mesh = make_mesh(devices=self.devices, **self.sizes)
        self.tx, self.schedule = make_optimizer(cfg.optimizer, t.steps)
        self.saved_cfg = as_asked(cfg, asked)  # another backend (moe-eval of a GPU run on CPU) resolves its own
        self.meta = {"config": self.saved_cfg.to_dict(), "data_fingerprint": data.fingerprint}
        self.checkpoints = Checkpoints(self.workdir / "checkpoints", keep=cfg.checkpoint.keep)
        self.save_blocking_ms: list[float] = []
        self._check_checkpoint_config()  # before any compile: an incompatible workdir is refused at once
        with self.context():
            self._init_state()
            self._fit_routers()
            self._compile()
            self._check_process_rows()
            self._make_probe()
            self._maybe_resume()
        # only once the checkpoints (if any) are known to match it; a run already done writes nothing
        if self.proc == 0 and int(self.state.step) < cfg.train.steps:
            write_text_atomic(self.workdir / "config.json", self.saved_cfg.to_json())

    def _abandon(self) -> None:
        for part in (self.checkpoints, self.writer):
            if part is not None:
                try:
                    part.close()
                except Exception:  # noqa: BLE001 - already failing; the first error is the report
                    pass
        if self.folder is not None:
            self.folder.abandon()

    def context(self):
        """The mesh and sharding rules every traced function runs under."""
        return mesh_and_rules(self.mesh, self.cfg.mesh.rules)

    # ---------------------------------------------------------------- state
    def _init_state(self):
        cfg = self.cfg
        self.graphdef, self.eval_graphdef, self.fits_routers, init = state_init(cfg, self.tx)
        abstract = jax.eval_shape(init)
        shardings, self.spread = state_shardings(cfg, abstract, self.tx)
        shards = self.sizes["data"] * self.sizes["fsdp"] * self.sizes["expert"]
        self.step_memory = step_memory(cfg, with_shardings(abstract, shardings), shards, self.sizes["tensor"])
        if self.memory_check:  # before anything is allocated
            check_fits(cfg, self.step_memory, self.devices)
        self.state = aligned(jax.jit(init, out_shardings=shardings), "the initialisation")()  # born sharded
        self.state_shardings = shardings_of(self.state)

    def _fit_routers(self) -> None:
        """Routers that learn from the training split's token counts (balanced_hash's table) do, before
        training (a resume restores the same state); a prepared folder's index has the counts."""
        if not self.fits_routers:
            return
        v = self.cfg.model.vocab_size
        counts = split_counts(self.train_corpus, v)
        model = nnx.merge(self.graphdef, self.state.params, self.state.model_state)
        model.fit_routers(counts)
        _, _, rest = split_model(model)
        self.state.model_state = jax.device_put(rest, self.state_shardings.model_state)
        self.log(f"routers fitted to the token counts of {len(self.train_corpus.tokens):,} training tokens")

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
        if self.cfg.train.init_from and not self.checkpoints.set_aside_steps():
            self._init_from(pathlib.Path(self.cfg.train.init_from))
            return
        if self.checkpoints.set_aside_steps():
            raise CheckpointError(
                f"{self.checkpoints.directory}: no checkpoint can be restored (set aside: "
                f"{', '.join(self.checkpoints.set_aside_steps())}); move them away to start afresh"
            )

    def _take_init_tokenizer(self, cfg: Config) -> None:
        """Fine-tuning (``train.init_from``) a BPE model with no tokenizer of its own: the initial run's,
        and the Hugging Face files an import kept (``hf/``, ``imported.json``: what ``moe-export`` writes back)."""
        if not cfg.train.init_from or self.proc != 0:
            return
        source = pathlib.Path(cfg.train.init_from)
        wanted = ["imported.json"] + [f"hf/{p.name}" for p in sorted((source / "hf").glob("*")) if p.is_file()]
        if cfg.data.tokenizer == "bpe" and not cfg.data.tokenizer_path:
            wanted.append("tokenizer.json")
        for name in wanted:
            if (source / name).is_file() and not (self.workdir / name).exists():
                (self.workdir / name).parent.mkdir(parents=True, exist_ok=True)
                write_text_atomic(self.workdir / name, (source / name).read_text(encoding="utf-8"))

    def _init_from(self, source: pathlib.Path) -> None:
        """Parameters (and the router state, where it is the same kind) from ``source``'s latest
        checkpoint, on this run's mesh; the optimizer starts afresh at step 0."""
        checkpoints = Checkpoints(source / "checkpoints", read_only=True)
        field = f"config.train.init_from={source}"
        try:
            step = checkpoints.latest_step()
            if step is None:
                raise ConfigError(f"{field}: no complete checkpoint")
            like, shardings = self.state.params, self.state_shardings.params
            try:  # parameters and router state together; the parameters alone for another router
                params, model_state, _ = checkpoints.restore_params(
                    step, like, shardings, self.state.model_state, self.state_shardings.model_state)
                self.state.model_state, kept = model_state, "parameters and router state"
            except Exception:  # noqa: BLE001 - the parameters' own restore below names what differs
                params, kept = None, "parameters (router state starts afresh: another router)"
            if params is None:
                try:
                    params, _, _ = checkpoints.restore_params(step, like, shardings)
                except Exception as e:  # noqa: BLE001 - a different model: name it in one line
                    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                    raise ConfigError(f"{field}: its parameters do not fit this model ({first}); use its config "
                                      f"(--config={source}/config.json) with the overrides the model allows") from None
            self.state.params = params
        finally:
            checkpoints.close()
        self.log(f"initialised from {source / 'checkpoints' / str(step)}: {kept}")

    def save_checkpoint(self, step: int, *, force: bool = False) -> None:
        """Start an asynchronous save; the loop is blocked only for the device-to-host copy."""
        start = time.perf_counter()
        self.checkpoints.save(step, self.state, self.batches.get_state(), self.meta, force=force)
        blocked_ms = 1e3 * (time.perf_counter() - start)
        self.save_blocking_ms.append(blocked_ms)
        self.log(f"checkpoint {step}: saving in the background (blocked {blocked_ms:.0f} ms)")

    # ---------------------------------------------------------------- the jitted steps
    def _compile(self):
        cfg = self.cfg
        self.batch_spec = logical_to_spec(("batch", "seq"), self.mesh)
        self.batch_sharding = jax.sharding.NamedSharding(self.mesh, self.batch_spec)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.P())
        # aligned: with several processes, every process has compiled a program before any runs it
        self.jit_step = aligned(jit_train_step(
            cfg, self.graphdef, self.tx, self.schedule, self.state_shardings, self.batch_sharding, self.spread
        ), "the train step")
        self.eval_step = aligned(jax.jit(
            make_eval_step(self.eval_graphdef),
            in_shardings=(self.state_shardings.params, self.state_shardings.model_state, self.batch_sharding),
            out_shardings=replicated,
        ), "the eval step")

    def _make_probe(self) -> None:
        """The router telemetry's fixed batch (the first validation batch), or None: no probe."""
        cfg = self.cfg
        self.probe = self.probe_inputs = self.probe_step = None
        if not has_probe(cfg):
            return
        t = cfg.train
        full = next(iter(eval_batches(self.val_corpus.tokens, t.seq_len, t.batch_size, 1)))  # the global batch
        rows = slice(self.proc * t.batch_size // self.nproc, (self.proc + 1) * t.batch_size // self.nproc)
        self.probe_inputs = self.global_batch({"inputs": full["inputs"][rows]})["inputs"]
        self.probe = RoutingProbe(full["inputs"], cfg.model.moe.num_experts, full["weights"] > 0)
        replicated = jax.sharding.NamedSharding(self.mesh, jax.P())
        step = jax.jit(make_probe_step(probe_graphdef(cfg)), out_shardings=replicated,
                       in_shardings=(self.state_shardings.params, self.state_shardings.model_state, self.batch_sharding))
        # compiled here, so that the first timed steps do not include it
        self.probe_step = step.lower(self.state.params, self.state.model_state, self.probe_inputs).compile()

    def routing_probe(self):
        """Dispatch the probe on the current state: {"layer<i>": [B,S] device ids}, or None."""
        if self.probe is None:
            return None
        return self.probe_step(self.state.params, self.state.model_state, self.probe_inputs)

    def stop_flags(self, requested: bool) -> jax.Array:
        """The [B, 1] stop input of a step: this process's rows carry its own flag (made once each)."""
        cache = self.__dict__.setdefault("_stop_flags", {})
        if requested not in cache:
            local = np.full((self.cfg.train.batch_size // self.nproc, 1), requested, np.int32)
            cache[requested] = jax.make_array_from_process_local_data(
                self.batch_sharding, local, (self.cfg.train.batch_size, 1)
            )
        return cache[requested]

    def train_step(self, state, batch, stop=None):
        """One jitted training step; ``stop`` defaults to nobody asking to stop."""
        return self.jit_step(state, batch, self.stop_flags(False) if stop is None else stop)

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
