"""``moe-import``: a local Hugging Face model folder -> a Switchyard workdir (config, tokenizer,
checkpoint 0) that ``moe-eval``, ``moe-generate`` and ``moe-train --config.train.init_from`` read.

Streaming: tensors are read one at a time from the safetensors files, converted, placed and written
a few at a time (Orbax partial saves of at most 64 MiB, or one larger tensor), so host memory holds
about one tensor of the model, never the model. Everything is checked first (the architecture and its settings, the
safetensors headers, every tensor's presence, float dtype and shape, no tensor left unread, the tokenizer; see
``guards``): a problem is one line naming it and nothing is written.
The workdir is built under a temporary name and renamed into place when complete (``staged_folder``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import time

import jax
import numpy as np

from train.errors import DataError
from train.interop.families import InteropError, Tensor, from_hf_config, tensors
from train.interop.guards import check_destination, check_tensors, read_hf_config
from train.interop.quantized import open_folder
from train.interop.safetensors import SafetensorsFolder
from train.services.workdir import staged_folder

# files of the model folder kept beside the checkpoint (``hf/``) and written back by ``moe-export``
HF_EXTRAS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
HF_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float32"}  # float16 is read into float32


def import_config(hf_dir: pathlib.Path):
    """(config.json, architecture, the run Config an import writes), from ``config.json`` alone."""
    from train.core.config import Config

    hf = read_hf_config(hf_dir)
    try:
        arch, model = from_hf_config(hf, where=str(hf_dir / "config.json"))
    except InteropError:
        raise
    except (TypeError, ValueError, AttributeError) as e:  # e.g. "num_hidden_layers": "four"
        raise DataError(f"{hf_dir / 'config.json'}: a field of the wrong type ({e})") from None
    dtype = str(hf.get("dtype") or hf.get("torch_dtype") or "float32")
    if dtype not in HF_DTYPES:
        raise InteropError(f"{hf_dir / 'config.json'}: dtype={dtype!r}: not supported ({', '.join(HF_DTYPES)})")
    model.dtype = model.param_dtype = HF_DTYPES[dtype]
    cfg = Config(model=model)
    # fine-tuning defaults (override on the command line): a small learning rate, every device on the batch
    cfg.optimizer.learning_rate, cfg.optimizer.warmup_steps, cfg.optimizer.weight_decay = 1e-5, 10, 0.0
    cfg.mesh.data, cfg.mesh.expert = -1, 1
    return hf, arch, cfg


def plan_import(hf_dir: pathlib.Path, *, allow_unused: bool = False, log=print):
    """(architecture, run Config, tensor table, the open folder, the tokenizer) after every check
    (``guards.check_tensors``: tensors the config does not read are refused unless ``allow_unused``)."""
    from train.core.config import validate
    from train.data.tokenizers import BPETokenizer

    hf, arch, cfg = import_config(hf_dir)
    model = cfg.model
    tokenizer_file = hf_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise DataError(f"--hf_dir={hf_dir}: no tokenizer.json (Switchyard reads the tokenizer from it)")
    specials = model_specials(hf, tokenizer_file)
    tokenizer = BPETokenizer.load(tokenizer_file, flag=str(tokenizer_file), **({"specials": specials} if specials else {}))
    if tokenizer.vocab_size > model.vocab_size:
        raise InteropError(f"{tokenizer_file}: {tokenizer.vocab_size} tokens (with <pad>, <bos>, <eos>) exceed the "
                           f"model's vocab_size={model.vocab_size}")
    cfg.data.tokenizer, cfg.data.special_tokens = "bpe", ",".join(specials)
    validate(cfg)
    folder = open_folder(SafetensorsFolder(hf_dir), hf, str(hf_dir / "config.json"))
    table = tensors(arch, model, interleaved=bool(hf.get("rope_interleave", True)))
    check_tensors(hf_dir, hf, arch, table, folder, allow_unused=allow_unused, log=log)
    return arch, cfg, table, folder, tokenizer


def model_specials(hf: dict, tokenizer_file: pathlib.Path) -> tuple[str, ...]:
    """The model's own (pad, bos, eos) tokens from ``config.json``'s ids (pad and bos default to eos),
    or () when it names no end-of-sequence token (Switchyard's <pad>, <bos>, <eos> are then appended)."""
    from tokenizers import Tokenizer as HFTokenizer

    try:
        raw = HFTokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # noqa: BLE001 - unreadable: BPETokenizer.load names the file
        raise DataError(f"{tokenizer_file}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None

    def token(key):
        ids = hf.get(key)
        ids = ids[0] if isinstance(ids, list) and ids else ids
        return raw.id_to_token(ids) if isinstance(ids, int) else None

    eos = token("eos_token_id")
    specials = (token("pad_token_id") or eos, token("bos_token_id") or eos, eos)
    return specials if eos and not any("," in t for t in specials) else ()


def _reader(folder: SafetensorsFolder, t: Tensor, dtype):
    """``callback(index) -> the slice of the Switchyard array`` (``jax.make_array_from_callback``),
    reading only the experts the slice covers (per-expert tensors), or the tensor once for all the
    slices (a tensor of every expert, as GPT-OSS stores them: read and converted once, not per device)."""
    whole = []

    def read(index):
        if t.stacked:
            experts = range(*index[0].indices(len(t.names)))
            rest = tuple(index[1:])
            out = None
            for i, e in enumerate(experts):  # one expert's tensor in memory at a time
                one = t.to_ours(folder[t.names[e]])[rest]
                if out is None:
                    out = np.empty((len(experts), *one.shape), dtype)
                out[i] = one
            return out
        if not whole:
            whole.append(np.asarray(t.to_ours(folder[t.names[0]])))
        return whole[0][index].astype(dtype, copy=False)

    return read


def _nested_set(tree: dict, path: str, value) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def import_model(hf_dir: str | os.PathLike, workdir: str | os.PathLike, *, allow_unused: bool = False,
                 log=print) -> dict:
    """Convert ``hf_dir`` into a new Switchyard ``workdir``; returns a summary (arch, parameters, seconds).
    Tensors of the folder that the config does not read are an error unless ``allow_unused``."""
    from moe.transformer import abstract_model, build_model
    from sharding.mesh import make_mesh
    from sharding.rules import mesh_and_rules
    from train.core.checkpoint import Checkpoints, abstract_arrays, to_nested, write_params
    from train.core.step import shardings_on, split_model
    from train.inference.evaluate import INFERENCE_RULES

    start = time.perf_counter()
    hf_dir, workdir = pathlib.Path(hf_dir), pathlib.Path(workdir)
    check_destination(workdir, "--workdir")  # before the checks that read the folder
    arch, cfg, table, folder, tokenizer = plan_import(hf_dir, allow_unused=allow_unused, log=log)
    log(f"moe-import: {arch} from {hf_dir}: {cfg.model.num_layers} layers, d_model {cfg.model.d_model}, "
        f"{cfg.model.moe.num_experts} experts (top-{cfg.model.moe.experts_per_token}), {cfg.model.param_dtype}")
    with staged_folder(workdir, "--workdir") as tmp:
        unrolled = dataclasses.replace(cfg.model, scan_layers="off")  # written unrolled; any layout restores it
        mesh = make_mesh(devices=jax.devices()[:1], data=1, expert=1)  # one copy of every array
        with mesh_and_rules(mesh, INFERENCE_RULES):
            _, params, model_state = split_model(abstract_model(unrolled))
            target = {"params": to_nested(abstract_arrays(params, shardings_on(params, mesh))),
                      "model_state": to_nested(abstract_arrays(model_state, shardings_on(model_state, mesh)))}
            by_path = {t.path: t for t in table}
            n_params = _check_mapped(target["params"], by_path)
            write_params(tmp / "params", _param_batches(target["params"], by_path, folder, log))
            # the small model state (router biases, RNG streams): initial values, then what the folder holds
            state = jax.jit(lambda: to_nested(split_model(build_model(unrolled))[2]))()
            for t in table:
                if t.item == "model_state":
                    leaf = lookup(target["model_state"], t.path)
                    _nested_set(state, t.path, jax.make_array_from_callback(
                        leaf.shape, leaf.sharding, _reader(folder, t, leaf.dtype)))
        meta = {"config": cfg.to_dict(), "data_fingerprint": "imported", "imported_from": {"arch": arch, "hf_dir": str(hf_dir)}}
        checkpoints = Checkpoints(tmp / "checkpoints", keep=1)
        try:
            checkpoints.save_model(0, tmp / "params", state, meta)
        finally:
            checkpoints.close()
        _write_files(tmp, hf_dir, arch, cfg, tokenizer)
    seconds = time.perf_counter() - start
    log(f"moe-import: wrote {workdir} ({n_params:,} parameters) in {seconds:.1f} s")
    return {"arch": arch, "parameters": n_params, "seconds": seconds, "workdir": str(workdir)}


def _write_files(tmp: pathlib.Path, hf_dir: pathlib.Path, arch: str, cfg, tokenizer) -> None:
    """Beside the checkpoint: the folder's tokenizer files (``hf/``), the tokenizer, the config, where it came from."""
    (tmp / "hf").mkdir()
    for name in HF_EXTRAS:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, tmp / "hf" / name)
    tokenizer.save(tmp / "tokenizer.json")
    (tmp / "config.json").write_text(cfg.to_json())
    (tmp / "imported.json").write_text(json.dumps({"arch": arch, "hf_dir": str(hf_dir.resolve())}, indent=2))


def lookup(tree: dict, path: str):
    """The leaf at ``path`` ("blocks/3/attn/wq") of a nested dict; ``InteropError`` when it is absent."""
    for p in path.split("/"):
        if p not in tree:
            raise InteropError(f"the checkpoint has no {path} (is it a model of this architecture?)")
        tree = tree[p]
    return tree


def _leaves(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        path = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from _leaves(v, path + "/")
        else:
            yield path, v


def _check_mapped(target: dict, by_path: dict) -> int:
    """The number of parameters of ``target``; ``InteropError`` for a variable no tensor is mapped to."""
    total = 0
    for path, leaf in _leaves(target):
        if path not in by_path:
            raise InteropError(f"no Hugging Face tensor is mapped to Switchyard's {path}")
        total += int(np.prod(leaf.shape))
    return total


def _param_batches(target: dict, by_path: dict, folder, log, batch_bytes: int = 64 << 20):
    """The parameters built from the folder, a nested dict of at most ``batch_bytes`` (or one larger
    array) at a time, for ``write_params``: host memory holds one batch, never the model."""
    pending, pending_bytes, done_blocks = {}, 0, set()
    blocks = len(target.get("blocks", {}))
    for path, leaf in _leaves(target):
        nbytes = int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize
        if pending and pending_bytes + nbytes > batch_bytes:
            yield pending
            pending, pending_bytes = {}, 0
        _nested_set(pending, path, jax.make_array_from_callback(
            leaf.shape, leaf.sharding, _reader(folder, by_path[path], leaf.dtype)))
        pending_bytes += nbytes
        parts = path.split("/")
        if parts[0] == "blocks" and parts[1] not in done_blocks:
            done_blocks.add(parts[1])
            if len(done_blocks) % max(1, blocks // 10) == 0:
                log(f"moe-import: block {len(done_blocks)}/{blocks}")
    if pending:
        yield pending
