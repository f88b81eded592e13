"""Orbax checkpoints behind a few functions (a move to Orbax's v1 API touches only this file).

Layout: ``WORKDIR/checkpoints/<step>/`` is a standard Orbax ``CheckpointManager`` step with
these items, each readable by a plain ``orbax-checkpoint`` reader without this project:
  params       nested dict of arrays (the model parameters)
  opt_state    {"optimizer": nested dict of arrays, "recent_losses": [W]} (never read for inference)
  train        {"step": int32, "model_state": nested dict}  (RNG streams stored as raw key data)
  data         JSON: the training data iterator state
  meta         JSON: the resolved config and the data fingerprint
Nested dicts are built from the state's key paths, so restoring needs only abstract arrays
carrying the target shardings, on any mesh. Saves are asynchronous; Orbax writes each step to
a temporary folder and renames it when complete, so a partial step is never taken as good.
"""

from __future__ import annotations

import errno
import pathlib
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp

from moe import layout
from sharding.distributed import barrier
from train.errors import CheckpointError
from train.services.memory import human_bytes

ARRAY_ITEMS = ("params", "opt_state", "train")
JSON_ITEMS = ("data", "meta")
SET_ASIDE = ".unreadable"
# Orbax splits every replicated array into one slice per replica so that the replicas write in
# parallel; each slice is an eager op dispatched while the training loop waits. Below this size
# one replica writes the whole array: the save blocks the loop for about a third as long
# (measured on the default config: ~360 -> ~100 ms, and 2.6 s -> 0.2 s for the first save).
REPLICA_PARALLEL_MIN_BYTES = 4 << 20


NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded")
# A save needs the state's bytes plus this share again (metadata, and the previous step is kept
# until the new one is complete).
SPACE_MARGIN = 1.1


def is_no_space(error: BaseException) -> bool:
    """Whether ``error`` (or an exception it was raised from) says the disk or quota is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in NO_SPACE_ERRNOS:
            return True
        if any(text in str(error).lower() for text in NO_SPACE_TEXT):
            return True
        error = error.__cause__ or error.__context__
    return False


def read_error_reason(error: BaseException) -> str:
    """The first line of the innermost cause of a failed read (Orbax wraps TensorStore's own
    message, e.g. OUT_OF_RANGE for a truncated file, in one that names only an array index)."""
    seen = set()
    while id(error) not in seen and (error.__cause__ or error.__context__) is not None:
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    text = (str(error).strip().splitlines() or [""])[0].strip()
    return f"{type(error).__name__}: {text}"[:300] if text else type(error).__name__


def state_bytes(state) -> int:
    """Bytes of every array in ``state`` (global sizes): what one checkpoint writes in all."""
    total = 0
    for leaf in jax.tree.leaves(state):
        if _is_prng_key(leaf):
            leaf = jax.eval_shape(jax.random.key_data, leaf)
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total


def _register_array_handler() -> None:
    handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


_register_array_handler()


# ---------------------------------------------------------------- pytree <-> nested dict
def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _is_prng_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def to_nested(tree) -> dict:
    """A pytree as nested dicts keyed by its path names (PRNG keys as raw key data)."""
    out: dict = {}
    for path, leaf in jax.tree.leaves_with_path(tree):
        names = [_key_name(p) for p in path if _key_name(p) != "value"]
        if _is_prng_key(leaf):
            leaf = jax.random.key_data(leaf)
        node = out
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1] if names else "value"] = leaf
    return out


def from_nested(nested: dict, like):
    """Inverse of ``to_nested``: the values of ``nested`` in the structure of ``like``."""
    paths_leaves, treedef = jax.tree.flatten_with_path(like)
    leaves = []
    for path, ref in paths_leaves:
        node = nested
        names = [_key_name(p) for p in path if _key_name(p) != "value"] or ["value"]
        for name in names:
            node = node[name]
        if _is_prng_key(ref):  # abstract targets carry no implementation: the default one made them
            impl = jax.random.key_impl(ref) if isinstance(ref, jax.Array) else None
            node = jax.random.wrap_key_data(node, impl=impl)
        leaves.append(node)
    return jax.tree.unflatten(treedef, leaves)


def abstract_arrays(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (PRNG keys as their raw data): what a restore
    of ``tree`` onto ``shardings`` asks for."""

    def one(x, s):
        if _is_prng_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=s)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

    return jax.tree.map(one, tree, shardings)


def write_params(where: pathlib.Path, batches) -> None:
    """A model's parameters written batch by batch (each a nested dict of arrays: Orbax partial saves)
    into the new folder ``where``, then finalised: the host holds one batch at a time, never the whole
    model. ``Checkpoints.save_model`` takes the folder in as a checkpoint's parameters."""
    import orbax.checkpoint.experimental.v1 as ocp_v1

    for batch in batches:
        ocp_v1.partial.save(where, batch)
    ocp_v1.partial.finalize(where)


def _as_dicts(tree):
    """Orbax's nested metadata as plain nested dicts (leaves keep their ``shape``)."""
    if hasattr(tree, "items"):
        return {k: _as_dicts(v) for k, v in tree.items()}
    return tree


# ---------------------------------------------------------------- the manager
class Checkpoints:
    """Save and restore run state under ``directory`` (one Orbax CheckpointManager)."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int = 3, read_only: bool = False):
        self.directory = pathlib.Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=not read_only,
            read_only=read_only,
            cleanup_tmp_directories=not read_only,  # a save cut short by a kill is never taken as good
            enable_async_checkpointing=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ARRAY_ITEMS + JSON_ITEMS)
        self._in_flight: int | None = None  # the step an asynchronous save is writing
        self._failed = False  # a save failed: close() must not raise it a second time

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
        """Start an asynchronous save of ``state`` (a TrainState); returns whether one started.

        A save that cannot be written (no space left, found before it starts where the free space is
        known, or reported by the save in flight) raises ``CheckpointError`` naming the step, the
        folder, why, and the last complete checkpoint, which is intact."""
        self.wait()  # the previous save's errors belong to its own step
        self._check_space(step, state)
        items = {
            "params": ocp.args.StandardSave(to_nested(state.params)),
            "opt_state": ocp.args.StandardSave(
                {"optimizer": to_nested(state.opt_state), "recent_losses": state.recent_losses}
            ),
            "train": ocp.args.StandardSave({"step": state.step, "model_state": to_nested(state.model_state)}),
            "data": ocp.args.JsonSave(data_state),
            "meta": ocp.args.JsonSave(meta),
        }
        try:
            started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        except Exception as e:
            raise self._save_failed(step, e) from e
        if started:
            self._in_flight = step
        return started

    def save_model(self, step: int, params: pathlib.Path, model_state, meta: dict) -> None:
        """Write checkpoint ``step`` of a model that has not trained here (an import): the parameters
        ``write_params`` put in the folder ``params`` (moved in, not copied), ``model_state`` (a nested
        dict), ``meta``, and no optimizer state (a run started from it makes its own). Blocks until written."""
        train = {"step": jax.numpy.zeros((), jax.numpy.int32), "model_state": model_state}
        items = {"train": ocp.args.StandardSave(train), "meta": ocp.args.JsonSave(meta), "data": ocp.args.JsonSave({})}
        try:
            self.manager.save(step, args=ocp.args.Composite(**items))
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(step, e) from e
        (params / "state").rename(self.directory / str(step) / "params")
        shutil.rmtree(params)

    def _check_space(self, step: int, state) -> None:
        need = state_bytes(state) * SPACE_MARGIN
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return  # not knowable here: the save itself reports a full disk
        if free < need:
            raise self._save_failed(
                step, None, f"it needs about {human_bytes(need)} and {human_bytes(free)} are free on that disk"
            )

    def _save_failed(self, step: int, error: BaseException | None, why: str = "") -> CheckpointError:
        """The one-line report of a save that failed (``error``), or was not started (``why``)."""
        self._failed = True
        if not why:
            first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
            why = "no space left on the device (or over the disk quota)" if is_no_space(error) else first
        complete = [s for s in self.all_steps() if s != step]
        intact = f"checkpoint {complete[-1]} is intact" if complete else "no earlier checkpoint exists"
        return CheckpointError(
            f"checkpoint {step}: saving to {self.directory / str(step)} failed: {why}; {intact}. "
            "Free space (or fix the folder), then run the same command to resume"
        )

    def read_meta(self, step: int) -> tuple[dict, dict]:
        """(meta, data state) of a saved step; no arrays are read."""
        out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore(), data=ocp.args.JsonRestore()))
        return out["meta"], out["data"]

    def _stored(self, step: int, item: str):
        """The nested metadata (shapes, dtypes) of what ``item`` of ``step`` stores, or None."""
        try:
            return ocp.StandardCheckpointer().metadata(self.directory / str(step) / item).item_metadata
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore itself reports it
            return None

    def _restore(self, step: int, targets: dict) -> dict:
        """Restore nested-dict ``targets`` (today's layout) by item, whatever layout the step stores."""
        items, back = {}, {}
        stored = {item: self._stored(step, item) for item in targets}
        params = stored.get("params")
        stored_stack = None if params is None else layout.stack_shape(_as_dicts(params))
        target_stack = layout.stack_shape(targets["params"]) if "params" in targets else None
        for item, target in targets.items():
            paths = None if stored[item] is None else layout.paths(stored[item])
            target, back[item] = layout.legacy(target, paths, stored_stack, target_stack)
            items[item] = ocp.args.StandardRestore(target)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        return {item: back[item](out[item]) for item in targets}

    def restore(self, step: int, like, shardings):
        """The full TrainState of ``step``, placed by ``shardings`` (any mesh)."""
        out = self._restore(step, {
            "params": to_nested(abstract_arrays(like.params, shardings.params)),
            "opt_state": {
                "optimizer": to_nested(abstract_arrays(like.opt_state, shardings.opt_state)),
                "recent_losses": abstract_arrays(like.recent_losses, shardings.recent_losses),
            },
            "train": {
                "step": abstract_arrays(like.step, shardings.step),
                "model_state": to_nested(abstract_arrays(like.model_state, shardings.model_state)),
            },
        })
        return type(like)(
            step=out["train"]["step"],
            params=from_nested(out["params"], like.params),
            opt_state=from_nested(out["opt_state"]["optimizer"], like.opt_state),
            model_state=from_nested(out["train"]["model_state"], like.model_state),
            recent_losses=out["opt_state"]["recent_losses"],
        )

    def restore_params(self, step: int, like_params, shardings, like_model_state=None, model_state_shardings=None):
        """Parameters only (and the small model state): the optimizer state is never read."""
        targets = {"params": to_nested(abstract_arrays(like_params, shardings))}
        if like_model_state is not None:
            mesh = jax.tree.leaves(shardings)[0].mesh
            replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
            targets["train"] = {
                "step": jax.ShapeDtypeStruct((), np.int32, sharding=replicated),
                "model_state": to_nested(abstract_arrays(like_model_state, model_state_shardings)),
            }
        out = self._restore(step, targets)
        params = from_nested(out["params"], like_params)
        if like_model_state is None:
            return params, None, None
        model_state = from_nested(out["train"]["model_state"], like_model_state)
        return params, model_state, int(out["train"]["step"])

    def set_aside(self, step: int) -> pathlib.Path:
        """Rename an unreadable step out of the manager's sight (never delete it); returns the new path."""
        src = self.directory / str(step)
        dst = self.directory / f"{step}{SET_ASIDE}"
        n = 1
        while dst.exists():
            dst, n = self.directory / f"{step}{SET_ASIDE}.{n}", n + 1
        if jax.process_index() == 0:
            src.rename(dst)
        barrier(f"set_aside_{step}")  # every process sees the rename before reloading
        self.manager.reload()
        return dst

    def set_aside_steps(self) -> list[str]:
        return sorted(p.name for p in self.directory.glob(f"*{SET_ASIDE}*"))

    def wait(self) -> None:
        """Block until the save in flight is complete; ``CheckpointError`` if it failed."""
        step, self._in_flight = self._in_flight, None
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(step if step is not None else -1, e) from e

    def close(self) -> None:
        """Wait for a save in flight (raising its failure once) and release the manager."""
        try:
            if not self._failed:
                self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:  # noqa: BLE001 - after a failed save the manager may fail again on close
                if not self._failed:
                    raise

