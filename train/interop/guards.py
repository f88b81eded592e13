"""What ``moe-import`` and ``moe-export`` check before they write anything: the folder they write,
the model folder's ``config.json``, that its tensors are exactly the ones the architecture reads
(present, of a float dtype, of the right shape, none left over), and that a checkpoint reads.

Each problem is one line naming the path or field (``DataError`` / ``WorkdirError`` / ``InteropError``:
exit code 2; a checkpoint that cannot be read: ``CheckpointError``, exit code 1).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile

from train.errors import RUN_ERRORS, USER_ERRORS, CheckpointError, DataError, WorkdirError
from train.interop.families import ARCHITECTURES, InteropError, Tensor, unread_layers
from train.interop.safetensors import FLOAT_DTYPES, SafetensorsFolder
from train.services.workdir import require_new_folder

# Tensors a model folder may hold that Switchyard does not read, and why (every other one unused by
# the config is refused unless --allow_unused): buffers transformers recomputes from the config...
IGNORED_PATTERNS = (re.compile(r"(^|\.)rotary_emb\.inv_freq$"),)
# ...and the layers after the model's own that its family does not read (``unread_layers``), stored as
# layers num_hidden_layers .. num_hidden_layers + n - 1: DeepSeek-V3's multi-token-prediction blocks
# (num_nextn_predict_layers, used for training and speculative decoding only).
MTP_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
SHOWN = 5  # unused tensors named in the message (the rest counted)


def check_destination(path: pathlib.Path, flag: str) -> None:
    """``WorkdirError`` unless ``path`` is a new (or empty) folder that can be created; creates nothing."""
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"{flag}={path}: exists and is not a directory")
    require_new_folder(path, flag)
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise WorkdirError(f"{flag}={path}: cannot be created ({parent} is not a directory)")
    try:
        probe = tempfile.mkdtemp(prefix=f".{path.name}.probe-", dir=parent)
    except OSError as e:
        raise WorkdirError(f"{flag}={path}: cannot be created in {parent} ({e.strerror or e})") from None
    os.rmdir(probe)


def read_hf_config(hf_dir: pathlib.Path) -> dict:
    """The model folder's ``config.json`` as a dict; ``DataError`` naming the path otherwise."""
    if not hf_dir.exists():
        raise DataError(f"--hf_dir={hf_dir}: no such folder")
    if not hf_dir.is_dir():
        raise DataError(f"--hf_dir={hf_dir}: not a directory (give the model folder)")
    path = hf_dir / "config.json"
    try:
        hf = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"--hf_dir={hf_dir}: no config.json") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    except ValueError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise DataError(f"{path}: a JSON {type(hf).__name__}, not an object")
    return hf


def check_tensors(hf_dir: pathlib.Path, hf: dict, arch: str, table: list[Tensor], folder: SafetensorsFolder,
                  *, allow_unused: bool = False, log=print) -> None:
    """Every tensor ``table`` reads is present, a float, and of its shape; tensors it does not read
    are refused (``--allow_unused``: logged) unless ``ignored``."""
    for t in table:
        for name in t.names:
            if name not in folder:
                raise InteropError(f"{hf_dir}: tensor {name} is missing ({arch}, needed for {t.path})")
            kind = folder.kind(name)
            if kind.startswith("F8_"):
                raise InteropError(f"{folder.file(name)}: tensor {name} has dtype {kind}: an FP8 checkpoint needs "
                                   "config.json's quantization_config (quant_method fp8, weight_block_size)")
            if kind not in FLOAT_DTYPES:
                raise InteropError(f"{folder.file(name)}: tensor {name} has dtype {kind}; weights are floats "
                                   f"({', '.join(FLOAT_DTYPES)})")
            if folder.shape(name) != t.hf_shape:
                raise InteropError(f"{hf_dir}: tensor {name} has shape {list(folder.shape(name))}, "
                                   f"expected {list(t.hf_shape)} ({arch})")
    used = {c for t in table for name in t.names for c in (name, *folder.companions(name))}
    unused = [name for name in folder.names() if name not in used and not ignored(name, hf)]
    if not unused:
        return
    listed = ", ".join(unused[:SHOWN]) + (f" and {len(unused) - SHOWN} more" if len(unused) > SHOWN else "")
    if not allow_unused:
        raise InteropError(f"{hf_dir}: {len(unused)} tensor(s) not used by config.json ({arch}, "
                           f"num_hidden_layers={hf.get('num_hidden_layers')}): {listed}; "
                           "pass --allow_unused to import without them")
    log(f"moe-import: --allow_unused: {len(unused)} tensor(s) not imported: {', '.join(unused)}")


def ignored(name: str, hf: dict) -> bool:
    """Whether a tensor the architecture does not read is expected in its folders (see the patterns above)."""
    if any(p.search(name) for p in IGNORED_PATTERNS):
        return True
    unread = unread_layers(hf)
    layer = MTP_LAYER.match(name)
    if not (layer and isinstance(unread, int) and unread > 0):
        return False
    first = int(hf["num_hidden_layers"])
    return first <= int(layer.group(1)) < first + unread


def read_imported_arch(workdir: pathlib.Path) -> str:
    """The architecture a workdir was imported from (``imported.json``), or "" for a run of its own."""
    path = workdir / "imported.json"
    if not path.is_file():
        return ""
    try:
        arch = json.loads(path.read_bytes())["arch"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: unreadable ({type(e).__name__}: {e}); pass --arch") from None
    if arch not in ARCHITECTURES:
        raise DataError(f"{path}: arch={arch!r}: not one of {', '.join(ARCHITECTURES)}; pass --arch")
    return arch


def restore_run(workdir: pathlib.Path, step: int | None):
    """``load_run`` (unrolled layout); a checkpoint it fails to read in a way it does not report
    itself becomes ``CheckpointError`` worded as ``moe-eval``'s, naming the step folder."""
    from train.inference.evaluate import load_run

    try:
        return load_run(workdir, step, scan_layers="off")
    except USER_ERRORS + RUN_ERRORS:
        raise
    except Exception as e:  # noqa: BLE001 - truncated or missing files of the step
        folder = workdir / "checkpoints"
        if step is None:
            steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
            step = max(steps, default=None)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise CheckpointError(f"checkpoint {step} at {folder / str(step)} cannot be read ({reason})") from None
