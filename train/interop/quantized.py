"""Block-scaled FP8 checkpoints (DeepSeek-V3/R1, Kimi-K2: ``quantization_config`` with
``quant_method: "fp8"`` and ``weight_block_size``): each 2-D weight ``W`` is stored as F8_E4M3 (or
F8_E5M2) beside ``W_scale_inv``, one float32 per ``[bh, bw]`` block (the last blocks may be partial),
and means ``W[i, j] * W_scale_inv[i // bh, j // bw]``. ``BlockFp8Folder`` reads such a folder's
weights dequantized to float32, tensor by tensor like any other; the importer then casts them to
the model's parameter dtype. Any other scheme is refused in one line naming it."""

from __future__ import annotations

import math

import numpy as np

from train.interop.families import InteropError
from train.interop.safetensors import FLOAT_DTYPES, SafetensorsFolder

FP8_KINDS = ("F8_E4M3", "F8_E5M2")
SCALE = "_scale_inv"  # the suffix of a weight's block scales


def block_size(hf: dict, where: str) -> tuple[int, int] | None:
    """The FP8 weight block of ``config.json``'s ``quantization_config``, or None (not quantized)."""
    q = hf.get("quantization_config")
    if q is None:
        return None
    field = f"{where}: quantization_config"
    if not isinstance(q, dict):
        raise InteropError(f"{field}: not an object")
    method = q.get("quant_method")
    if method != "fp8":
        raise InteropError(f"{field}.quant_method={method!r}: not supported (block-scaled fp8 only)")
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise InteropError(f"{field}.weight_block_size={block!r}: two positive integers needed "
                           "(per-tensor fp8 scales are not supported)")
    fmt = q.get("fmt", "e4m3")
    if fmt not in ("e4m3", "e5m2"):
        raise InteropError(f"{field}.fmt={fmt!r}: not supported (e4m3 or e5m2)")
    return block[0], block[1]


class BlockFp8Folder:
    """A ``SafetensorsFolder`` whose FP8 weights read dequantized (float32); each is checked when the
    folder is opened: two-dimensional, with a float ``<name>_scale_inv`` of one value per block."""

    def __init__(self, folder: SafetensorsFolder, block: tuple[int, int]):
        self.folder, self.block = folder, block
        self.quantized: set[str] = set()
        for name in folder.names():
            if folder.kind(name) not in FP8_KINDS:
                continue
            shape, scale = folder.shape(name), name + SCALE
            where = f"{folder.file(name)}: tensor {name}"
            if len(shape) != 2:
                raise InteropError(f"{where}: an FP8 tensor of shape {list(shape)}; block scales need 2 dimensions")
            if scale not in folder:
                raise InteropError(f"{where}: FP8 without its {scale}")
            blocks = [math.ceil(n / b) for n, b in zip(shape, block, strict=True)]
            if folder.kind(scale) not in FLOAT_DTYPES or list(folder.shape(scale)) != blocks:
                raise InteropError(f"{folder.file(scale)}: tensor {scale}: {folder.kind(scale)} "
                                   f"{list(folder.shape(scale))}, expected float {blocks} (blocks of {list(block)})")
            self.quantized.add(name)

    def __contains__(self, name: str) -> bool:
        return name in self.folder

    def names(self) -> list[str]:
        return self.folder.names()

    def file(self, name: str):
        return self.folder.file(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.folder.shape(name)

    def kind(self, name: str) -> str:
        return "F32" if name in self.quantized else self.folder.kind(name)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(np.float32) if name in self.quantized else self.folder.dtype(name)

    def companions(self, name: str) -> tuple[str, ...]:
        """The tensors read with ``name`` (its block scales)."""
        return (name + SCALE,) if name in self.quantized else ()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.quantized:
            return self.folder[name]
        return dequantize(self.folder[name], self.folder[name + SCALE], self.block)


def dequantize(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """``weight * scale_inv`` with each scale spread over its block (float32)."""
    (rows, cols), (bh, bw) = weight.shape, block
    scales = np.repeat(np.repeat(scale_inv.astype(np.float32), bh, axis=0), bw, axis=1)[:rows, :cols]
    return weight.astype(np.float32) * scales


def open_folder(folder: SafetensorsFolder, hf: dict, where: str):
    """``folder`` as the importer reads it: dequantizing when ``config.json`` says it is quantized."""
    block = block_size(hf, where)
    return folder if block is None else BlockFp8Folder(folder, block)
