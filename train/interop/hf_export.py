"""``moe-export``: a Switchyard checkpoint -> a Hugging Face model folder (safetensors shards,
``config.json``, the tokenizer) that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.

Any checkpoint of an exportable model: trained with expert parallelism on any mesh, scanned or
unrolled (it is read unrolled, on this process's devices). The architecture is the one the workdir
was imported from, else inferred from the model's pieces (``--arch`` to choose); a model the
architecture cannot express (a router, shared experts, tied embeddings it lacks) is refused with one
line naming the field, before anything is written; so is a checkpoint that cannot be read
(``guards.restore_run``). The folder is written under a temporary name and renamed into place when
complete. A byte-tokenizer run's tokenizer is written as a ``tokenizer.json`` that gives the same ids
(``byte_tokenizer``), so ``moe-import`` reads the export back.
"""

from __future__ import annotations

import collections
import json
import math
import os
import pathlib
import shutil

import jax
import numpy as np

from train.core.checkpoint import to_nested
from train.interop.byte_tokenizer import byte_tokenizer_json
from train.interop.families import ARCHITECTURES, InteropError, infer_architecture, tensors, to_hf_config
from train.interop.guards import check_destination, read_imported_arch, restore_run
from train.interop.hf_import import HF_EXTRAS, lookup
from train.interop.safetensors import write_shards
from train.services.workdir import staged_folder

EXPORT_DTYPES = ("float32", "bfloat16")


def export_model(workdir: str | os.PathLike, out: str | os.PathLike, *, step: int | None = None, arch: str = "",
                 dtype: str = "", max_shard_gb: float = 2.0, log=print) -> dict:
    workdir, out = pathlib.Path(workdir), pathlib.Path(out)
    check_destination(out, "--hf_dir")  # before the checkpoint is read
    if arch and arch not in ARCHITECTURES:
        raise InteropError(f"--arch={arch}: choose one of {', '.join(ARCHITECTURES)}")
    if dtype and dtype not in EXPORT_DTYPES:
        raise InteropError(f"--dtype={dtype}: choose one of {', '.join(EXPORT_DTYPES)}")
    if not 0 < max_shard_gb < math.inf:
        raise InteropError(f"--max_shard_gb={max_shard_gb}: must be a finite number > 0")
    arch = arch or read_imported_arch(workdir)
    run = restore_run(workdir, step)  # one block at a time in the unrolled layout
    cfg = run.cfg.model
    arch = arch or infer_architecture(cfg)
    dtype = dtype or cfg.param_dtype
    hf_config = to_hf_config(arch, cfg, dtype)
    hf_config.update(special_token_ids(run))
    table = tensors(arch, cfg)
    params, state = to_nested(run.params), to_nested(run.model_state)
    np_dtype = np.dtype(jax.numpy.dtype(dtype))
    plan = list({name: (name, t.hf_shape, np_dtype) for t in table for name in t.names}.values())

    sharers = collections.Counter(t.names[0] for t in table if t.join is not None)  # variables per shared tensor

    def produce():
        parts: dict[str, list] = {}  # the parts of a tensor several variables share, until the last
        for t in table:
            value = np.asarray(jax.device_get(lookup(params if t.item == "params" else state, t.path)))
            if t.stacked:
                for e, name in enumerate(t.names):
                    yield name, t.to_hf(value[e])
            elif t.join is not None:
                name = t.names[0]
                parts.setdefault(name, []).append(t.to_hf(value))
                if len(parts[name]) == sharers[name]:
                    yield name, t.join(*parts.pop(name))
            else:
                yield t.names[0], t.to_hf(value)

    with staged_folder(out, "--hf_dir") as tmp:
        files = write_shards(tmp, plan, produce, int(max_shard_gb * (1 << 30)))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        extras = workdir / "hf"
        for name in HF_EXTRAS:
            if (extras / name).is_file():
                shutil.copyfile(extras / name, tmp / name)
        write_tokenizer(run, tmp / "tokenizer.json")
    n = sum(int(np.prod(t.shape)) for t in table if t.item == "params")
    log(f"moe-export: {arch} step {run.step} of {workdir} -> {out} ({len(files)} safetensors file(s), {n:,} parameters, {dtype})")
    return {"arch": arch, "step": run.step, "files": files, "parameters": n}


def write_tokenizer(run, path: pathlib.Path) -> None:
    """The run's tokenizer as ``tokenizer.json`` (unless an imported model's own was copied): the
    workdir's BPE, or the byte tokenizer written as one (``byte_tokenizer``)."""
    if path.is_file():
        return
    if run.cfg.data.tokenizer == "byte":
        path.write_text(byte_tokenizer_json(), encoding="utf-8")
    elif (run.workdir / "tokenizer.json").is_file():
        shutil.copyfile(run.workdir / "tokenizer.json", path)


def special_token_ids(run) -> dict:
    """``bos_token_id``, ``eos_token_id``, ``pad_token_id`` of the run's tokenizer (the imported
    model's own for an import), so that generation in ``transformers`` stops where Switchyard's does."""
    from train.data.tokenizers import build_tokenizer

    if run.cfg.data.tokenizer == "bpe" and not (run.cfg.data.tokenizer_path or (run.workdir / "tokenizer.json").is_file()):
        return {}
    tokenizer = build_tokenizer(run.cfg.data, run.workdir, lambda: iter(()))
    return {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
