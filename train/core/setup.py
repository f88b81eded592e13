"""Everything a run needs before its first step: ``setup(cfg, workdir) -> (Run, TrainState)``.

``setup`` builds the parts in order: the run folder (locked), the tokenizer and data, the mesh, the
optimizer, the checkpoints, the state (born sharded, after a memory pre-flight), routers fitted to
the training split, the jitted programs, the router probe, then the latest restorable checkpoint.
Anything that fails leaves the workdir as it was found. The ``Run`` is frozen: nothing rebinds its
parts after ``setup``; the training state is a separate value that the loop's functions
(``train.core.loop.train``) take and return.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
from typing import Any, Callable

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
from train.core.run import Probe, Programs, Run
from train.core.step import (TrainState, loss_for, make_eval_step, make_probe_step, make_train_step,
                             shardings_of, split_model)
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


def setup(
    cfg: Config,
    workdir: str | pathlib.Path,
    *,
    devices=None,
    log: Callable[[str], None] | None = None,
    memory_check: bool = True,
) -> tuple[Run, TrainState]:
    """The run of ``cfg`` in ``workdir`` and its training state (restored from the latest checkpoint
    that restores, if any). ``memory_check``: refuse a step that cannot fit the devices
    (``train.services.memory``) before allocating the state. ``Run.close()`` when done."""
    validate(cfg)
    workdir = pathlib.Path(workdir)
    proc, nproc = jax.process_index(), jax.process_count()
    devices = tuple(jax.devices() if devices is None else devices)
    sizes = validate_mesh(cfg, len(devices))
    folder = take_run_folder(workdir, proc, nproc)
    opened: list = []  # the parts to close if a later one fails
    try:
        resolved = for_backend(copy.deepcopy(cfg), devices[0].platform)
        writer = metrics_lib.MetricsWriter(workdir, total_steps=resolved.train.steps, enabled=proc == 0)
        opened.append(writer)
        log = log or writer.log
        if proc == 0:
            take_init_tokenizer(resolved, workdir)
        # raw text read and tokenized here, or a prepared folder memory-mapped (its settings in force)
        data = open_run_data(resolved.data, workdir, write=proc == 0, log=log)
        resolved.data = data.cfg
        resolved = with_vocab(resolved, data.tokenizer.vocab_size)
        t = resolved.train
        batches = TrainBatches(data.train.tokens, t.seq_len, t.batch_size, t.seed, proc, nproc)
        mesh = make_mesh(devices=devices, **sizes)
        tx, schedule = make_optimizer(resolved.optimizer, t.steps)
        saved_cfg = as_asked(resolved, cfg)  # another backend (moe-eval of a GPU run on CPU) resolves its own
        meta = {"config": saved_cfg.to_dict(), "data_fingerprint": data.fingerprint}
        checkpoints = Checkpoints(workdir / "checkpoints", keep=resolved.checkpoint.keep)
        opened.append(checkpoints)
        check_checkpoint_config(checkpoints, meta)  # before any compile: an incompatible workdir is refused at once
        with mesh_and_rules(mesh, resolved.mesh.rules):
            state, parts, step_memory = init_state(resolved, tx, sizes, devices, memory_check)
            state = fit_routers(resolved, parts, state, data.train, log)
            programs = compile_programs(resolved, mesh, tx, schedule, parts, proc, nproc)
            check_process_rows(resolved, programs.batch_sharding, proc, nproc)
            run = Run(resolved, saved_cfg, meta, workdir, proc, nproc, devices, mesh, folder, writer, log, data,
                      batches, tx, schedule, checkpoints, programs, None, step_memory)
            run = dataclasses.replace(run, probe=make_probe(run, state))
            state = resume(run, state)
    except BaseException:
        for part in reversed(opened):
            try:
                part.close()
            except Exception:  # noqa: BLE001 - already failing; the first error is the report
                pass
        if folder is not None:
            folder.abandon()  # the workdir as it was found
        raise
    # only once the checkpoints (if any) are known to match it; a run already done writes nothing
    if proc == 0 and int(state.step) < run.cfg.train.steps:
        write_text_atomic(workdir / "config.json", saved_cfg.to_json())
    return run, state


# ---------------------------------------------------------------- the state
@dataclasses.dataclass(frozen=True)
class _Parts:
    """What the initialisation knows besides the state: the graphdefs and the shardings."""

    graphdef: Any
    eval_graphdef: Any
    fits_routers: bool
    state_shardings: TrainState
    spread: Any


def init_state(cfg: Config, tx, sizes: dict, devices, memory_check: bool) -> tuple[TrainState, _Parts, Any]:
    """(the initial state, born sharded; its parts; the step's memory estimate), checked to fit the
    devices before anything is allocated (``memory_check``). Under the run's mesh and rules."""
    graphdef, eval_graphdef, fits_routers, init = state_init(cfg, tx)
    abstract = jax.eval_shape(init)
    shardings, spread = state_shardings(cfg, abstract, tx)
    shards = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    memory = step_memory(cfg, with_shardings(abstract, shardings), shards, sizes["tensor"])
    if memory_check:  # before anything is allocated
        check_fits(cfg, memory, list(devices))
    state = aligned(jax.jit(init, out_shardings=shardings), "the initialisation")()  # born sharded
    return state, _Parts(graphdef, eval_graphdef, fits_routers, shardings_of(state), spread), memory


def fit_routers(cfg: Config, parts: _Parts, state: TrainState, train_corpus, log) -> TrainState:
    """Routers that learn from the training split's token counts (balanced_hash's table) do, before
    training (a resume restores the same state); a prepared folder's index has the counts."""
    if not parts.fits_routers:
        return state
    model = nnx.merge(parts.graphdef, state.params, state.model_state)
    model.fit_routers(split_counts(train_corpus, cfg.model.vocab_size))
    _, _, rest = split_model(model)
    log(f"routers fitted to the token counts of {len(train_corpus.tokens):,} training tokens")
    return dataclasses.replace(state, model_state=jax.device_put(rest, shardings_of(state).model_state))


def check_checkpoint_config(checkpoints: Checkpoints, meta: dict) -> None:
    """Refuse a workdir whose latest checkpoint was written by an incompatible config."""
    step = checkpoints.latest_step()
    if step is not None:
        try:
            saved, _ = checkpoints.read_meta(step)
        except Exception:  # noqa: BLE001 - an unreadable step is handled by resume
            return
        check_compatible(meta, saved, checkpoints.directory / str(step))


def resume(run: Run, state: TrainState) -> TrainState:
    """The state of the latest checkpoint that restores (the data position with it); unreadable ones
    are set aside, named. None at all: ``train.init_from``'s parameters, or ``state`` itself."""
    checkpoints = run.checkpoints
    shardings = run.programs.state_shardings
    for step in reversed(checkpoints.all_steps()):
        where = checkpoints.directory / str(step)
        try:
            meta, data_state = checkpoints.read_meta(step)
            check_compatible(run.meta, meta, where)
            restored = checkpoints.restore(step, state, shardings)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - truncated or missing files: fall back
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            moved = checkpoints.set_aside(step)
            run.log(f"checkpoint {step} at {where} cannot be restored ({reason}); kept as {moved.name}, trying an older one")
            continue
        run.batches.set_state(data_state)
        run.log(f"resumed from {where}")
        return restored
    if checkpoints.set_aside_steps():
        raise CheckpointError(
            f"{checkpoints.directory}: no checkpoint can be restored (set aside: "
            f"{', '.join(checkpoints.set_aside_steps())}); move them away to start afresh"
        )
    if run.cfg.train.init_from:
        return init_from(run, state, pathlib.Path(run.cfg.train.init_from))
    return state


def take_init_tokenizer(cfg: Config, workdir: pathlib.Path) -> None:
    """Fine-tuning (``train.init_from``) a BPE model with no tokenizer of its own: the initial run's,
    and the Hugging Face files an import kept (``hf/``, ``imported.json``: what ``moe-export`` writes back)."""
    if not cfg.train.init_from:
        return
    source = pathlib.Path(cfg.train.init_from)
    wanted = ["imported.json"] + [f"hf/{p.name}" for p in sorted((source / "hf").glob("*")) if p.is_file()]
    if cfg.data.tokenizer == "bpe" and not cfg.data.tokenizer_path:
        wanted.append("tokenizer.json")
    for name in wanted:
        if (source / name).is_file() and not (workdir / name).exists():
            (workdir / name).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(workdir / name, (source / name).read_text(encoding="utf-8"))


def init_from(run: Run, state: TrainState, source: pathlib.Path) -> TrainState:
    """``state`` with the parameters (and the router state, where it is the same kind) of ``source``'s
    latest checkpoint, on this run's mesh; the optimizer starts afresh at step 0."""
    checkpoints = Checkpoints(source / "checkpoints", read_only=True)
    field = f"config.train.init_from={source}"
    shardings = run.programs.state_shardings
    try:
        step = checkpoints.latest_step()
        if step is None:
            raise ConfigError(f"{field}: no complete checkpoint")
        try:  # parameters and router state together; the parameters alone for another router
            params, model_state, _ = checkpoints.restore_params(
                step, state.params, shardings.params, state.model_state, shardings.model_state)
            kept = "parameters and router state"
        except Exception:  # noqa: BLE001 - the parameters' own restore below names what differs
            params, model_state, kept = None, state.model_state, "parameters (router state starts afresh: another router)"
        if params is None:
            try:
                params, _, _ = checkpoints.restore_params(step, state.params, shardings.params)
            except Exception as e:  # noqa: BLE001 - a different model: name it in one line
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
                raise ConfigError(f"{field}: its parameters do not fit this model ({first}); use its config "
                                  f"(--config={source}/config.json) with the overrides the model allows") from None
    finally:
        checkpoints.close()
    run.log(f"initialised from {source / 'checkpoints' / str(step)}: {kept}")
    return dataclasses.replace(state, params=params, model_state=model_state)


# ---------------------------------------------------------------- the jitted programs
def compile_programs(cfg: Config, mesh, tx, schedule, parts: _Parts, proc: int, nproc: int) -> Programs:
    """The training and evaluation steps, jitted for the state's shardings (compiled at first use)."""
    batch_sharding = jax.sharding.NamedSharding(mesh, logical_to_spec(("batch", "seq"), mesh))
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    shardings = parts.state_shardings
    # aligned: with several processes, every process has compiled a program before any runs it
    train_step = aligned(jit_train_step(cfg, parts.graphdef, tx, schedule, shardings, batch_sharding, parts.spread),
                         "the train step")
    eval_step = aligned(jax.jit(
        make_eval_step(parts.eval_graphdef),
        in_shardings=(shardings.params, shardings.model_state, batch_sharding),
        out_shardings=replicated,
    ), "the eval step")
    b = cfg.train.batch_size

    def flags(requested: bool) -> jax.Array:  # this process's rows carry its own flag
        local = np.full((b // nproc, 1), requested, np.int32)
        return jax.make_array_from_process_local_data(batch_sharding, local, (b, 1))

    return Programs(parts.graphdef, parts.eval_graphdef, shardings, parts.spread, batch_sharding, train_step,
                    eval_step, (flags(False), flags(True)))


def make_probe(run: Run, state: TrainState) -> Probe | None:
    """The router telemetry's fixed batch and its program, compiled here so that the first timed
    steps do not include it; None when the model has no probe."""
    cfg = run.cfg
    if not has_probe(cfg):
        return None
    t = cfg.train
    full = next(iter(eval_batches(run.data.validation.tokens, t.seq_len, t.batch_size, 1)))  # the global batch
    rows = slice(run.proc * t.batch_size // run.nproc, (run.proc + 1) * t.batch_size // run.nproc)
    inputs = run.global_batch({"inputs": full["inputs"][rows]})["inputs"]
    telemetry = RoutingProbe(full["inputs"], cfg.model.moe.num_experts, full["weights"] > 0)
    shardings = run.programs.state_shardings
    replicated = jax.sharding.NamedSharding(run.mesh, jax.P())
    step = jax.jit(make_probe_step(probe_graphdef(cfg)), out_shardings=replicated,
                   in_shardings=(shardings.params, shardings.model_state, run.programs.batch_sharding))
    return Probe(telemetry, inputs, step.lower(state.params, state.model_state, inputs).compile())


def check_process_rows(cfg: Config, batch_sharding, proc: int, nproc: int) -> None:
    """Each process reads the p-th contiguous block of rows: the mesh must place it there."""
    b, s = cfg.train.batch_size, cfg.train.seq_len
    starts, stops = set(), set()
    for index in batch_sharding.addressable_devices_indices_map((b, s)).values():
        starts.add(index[0].start or 0)
        stops.add(b if index[0].stop is None else index[0].stop)
    local = b // nproc
    if (min(starts), max(stops)) != (proc * local, (proc + 1) * local):
        raise ConfigError(
            f"config.mesh: process {proc} holds batch rows {min(starts)}..{max(stops)}, not its own "
            f"contiguous block {proc * local}..{(proc + 1) * local}; order the mesh so that each "
            "process's devices are adjacent on the batch axes"
        )
