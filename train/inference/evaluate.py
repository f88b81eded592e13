"""Restore a trained model anywhere and use it: score data (moe-eval) or sample text (moe-generate).

Only parameters (and the model's small RNG state) are read from the checkpoint, never the
optimizer state, onto whatever devices are present: the checkpoint's own mesh does not matter.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys

import jax
import numpy as np
from flax import nnx

from moe.transformer import Transformer, abstract_model
from sharding.distributed import aligned
from sharding.mesh import make_mesh
from sharding.rules import logical_to_spec, mesh_and_rules
from train.core.checkpoint import Checkpoints, read_error_reason
from train.core.config import Config, for_backend, from_dict
from train.core.step import make_eval_step, score, shardings_on, split_model
from train.data.batches import eval_batches
from train.data.prepared import open_eval_data
from train.errors import CheckpointError, ConfigError, DataError


# evaluation, decoding and import run on a data x expert mesh (inference_mesh_sizes) with the experts
# over ``expert`` and everything else replicated, whatever rules the run was trained with
INFERENCE_RULES = "ep"


def inference_mesh_sizes(cfg: Config, num_devices: int) -> dict[str, int]:
    """Experts spread as far as the devices allow; the rest of the devices split the batch."""
    experts = cfg.model.moe.num_experts if cfg.model.moe_every else 1
    expert = math.gcd(experts, num_devices)
    return {"data": num_devices // expert, "expert": expert}


@dataclasses.dataclass
class LoadedRun:
    cfg: Config
    step: int
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    params: nnx.State
    model_state: nnx.State
    workdir: pathlib.Path

    def context(self):
        return mesh_and_rules(self.mesh, INFERENCE_RULES)

    def model(self) -> Transformer:
        return nnx.merge(self.graphdef, self.params, self.model_state)


def load_run(workdir: str | pathlib.Path, step: int | None = None, devices=None, scan_layers: str | None = None,
             log=None) -> LoadedRun:
    """Parameters of ``step`` (default: the latest readable one) in eval mode, placed on ``devices``;
    ``scan_layers`` overrides the run's ``model.scan_layers`` (either layout reads either).

    Reading only (training may be writing the folder), nothing is renamed: an unreadable latest step
    is named in one line (``log``) and the one before it is read; ``CheckpointError`` when the
    requested ``step`` or every step is unreadable."""
    workdir = pathlib.Path(workdir)
    ckpt_dir = workdir / "checkpoints"
    if not ckpt_dir.is_dir():
        raise ConfigError(f"--workdir={workdir}: no checkpoints folder")
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    devices = list(jax.devices() if devices is None else devices)
    checkpoints = Checkpoints(ckpt_dir, read_only=True)
    try:
        steps = checkpoints.all_steps()
        if not steps:
            raise ConfigError(f"--workdir={workdir}: no complete checkpoint")
        if step is not None and step not in steps:
            raise ConfigError(f"--step={step}: not among the checkpoints in {ckpt_dir} ({', '.join(map(str, steps))})")
        for candidate in [step] if step is not None else steps[::-1]:
            try:
                return _load_step(checkpoints, candidate, devices, scan_layers, workdir)
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - truncated or missing files: name them, try an older step
                where = f"checkpoint {candidate} at {ckpt_dir / str(candidate)} cannot be read ({read_error_reason(e)})"
                if step is not None:
                    raise CheckpointError(f"--step={step}: {where}") from None
                log(f"{where}; trying an older one")
        raise CheckpointError(f"{ckpt_dir}: no checkpoint can be read (steps {', '.join(map(str, steps))})")
    finally:
        checkpoints.close()


def _load_step(checkpoints: Checkpoints, step: int, devices, scan_layers: str | None, workdir: pathlib.Path
               ) -> LoadedRun:
    meta, _ = checkpoints.read_meta(step)
    cfg = for_backend(from_dict(meta["config"]), devices[0].platform)
    if scan_layers is not None:
        cfg.model.scan_layers = scan_layers
    mesh = make_mesh(devices=devices, **inference_mesh_sizes(cfg, len(devices)))
    with mesh_and_rules(mesh, INFERENCE_RULES):
        graphdef, params, model_state = split_model(abstract_model(cfg.model, "eval"))
        params, model_state, _ = checkpoints.restore_params(step, params, shardings_on(params, mesh), model_state,
                                                            shardings_on(model_state, mesh))
    return LoadedRun(cfg, step, mesh, graphdef, params, model_state, workdir)


def evaluate_run(run: LoadedRun, *, data_path: str | None = None, max_batches: int = 0, log=print) -> dict:
    """Score the validation split (or every file of ``data_path``) with the restored parameters."""
    cfg = run.cfg
    data_cfg = cfg.data if data_path is None else dataclasses.replace(cfg.data, path=data_path, max_bytes=0)
    _, corpus = open_eval_data(cfg.data, run.workdir, data_path)  # raw text, or a prepared folder memory-mapped
    shards = run.mesh.size
    batch = shards * -(-cfg.train.batch_size // shards)
    batches = eval_batches(
        corpus.tokens, cfg.train.seq_len, batch, max_batches, jax.process_index(), jax.process_count(),
        data_path=data_cfg.path,
    )
    with run.context():
        sharding = jax.sharding.NamedSharding(run.mesh, logical_to_spec(("batch", "seq"), run.mesh))
        step = aligned(jax.jit(make_eval_step(run.graphdef)), "the eval step")

        def to_global(local):
            return {k: jax.make_array_from_process_local_data(sharding, v, (batch, *v.shape[1:])) for k, v in local.items()}

        log(f"scoring {len(batches)} batches of {batch} x {cfg.train.seq_len} tokens on {shards} device(s)")
        result = score(step, run.params, run.model_state, _with_progress(batches, log), to_global, corpus.num_bytes,
                       len(corpus.tokens))
    return {"step": run.step, **result}


def _with_progress(batches, log):
    """The batches, with a progress bar on an interactive terminal, else a line every tenth."""
    n = len(batches)
    if sys.stderr.isatty() and jax.process_index() == 0:
        from tqdm import tqdm

        yield from tqdm(batches, desc="scoring", unit="batch", file=sys.stderr, leave=False)
        return
    every = max(1, n // 10)
    for i, batch in enumerate(batches, 1):
        yield batch  # the caller scores it before asking for the next
        if i % every == 0 or i == n:
            log(f"scored {i}/{n} batches")


def require_tokens(tokenizer, text: str) -> np.ndarray:
    ids = tokenizer.encode(text)
    if len(ids) == 0:
        raise DataError("--prompt: encodes to no tokens; give some text")
    return ids
