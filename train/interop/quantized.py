"""Quantized checkpoints, read dequantized to float32 tensor by tensor like any other (the importer
then casts them to the model's parameter dtype). ``config.json``'s ``quantization_config`` names the
scheme (``quant_method``); two are read, any other is refused in one line naming it:

- ``"fp8"``, block-scaled (DeepSeek-V3/R1, Kimi-K2, with ``weight_block_size``): each 2-D weight ``W``
  is stored as F8_E4M3 (or F8_E5M2) beside ``W_scale_inv``, one float32 per ``[bh, bw]`` block (the
  last blocks may be partial), and means ``W[i, j] * W_scale_inv[i // bh, j // bw]``
  (``BlockFp8Folder``).
- ``"mxfp4"`` (GPT-OSS, whose expert weights alone are quantized; ``modules_to_not_convert`` are
  stored as plain floats): a parameter ``P`` of transformers' model is stored as ``P_blocks``, uint8
  ``[E, N, G, 16]`` holding two FP4 (e2m1) codes per byte, the low nibble first, and ``P_scales``,
  uint8 ``[E, N, G]``, one E8M0 exponent (bias 127) per 32 values, each value meaning
  ``FP4[code] * 2**(scale - 127)``. ``P`` is those ``[E, N, G * 32]`` values with the last two
  dimensions swapped, ``[E, G * 32, N]``, as transformers loads it (``gate_up_proj``:
  ``[E, hidden, 2 * intermediate]``, ``down_proj``: ``[E, intermediate, hidden]``).
  ``Mxfp4Folder`` shows ``P`` in place of the pair."""

from __future__ import annotations

import math

import numpy as np

from train.interop.families import InteropError
from train.interop.safetensors import FLOAT_DTYPES, SafetensorsFolder

FP8_KINDS = ("F8_E4M3", "F8_E5M2")
SCALE = "_scale_inv"  # the suffix of a weight's block scales
METHODS = ("fp8", "mxfp4")  # the quant_method values read
BLOCKS, SCALES = "_blocks", "_scales"  # the suffixes of an MXFP4 parameter's codes and exponents
MXFP4_BYTES = 16  # bytes per block of 32 FP4 values, the last dimension of P_blocks
# the FP4 (e2m1) value of each 4-bit code: sign bit 3, then 2 exponent bits and 1 mantissa bit
FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                       -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
# each byte's two values, low nibble first: [256, 2]
FP4_PAIRS = np.stack([FP4_VALUES[np.arange(256) & 0x0F], FP4_VALUES[np.arange(256) >> 4]], axis=1)
E8M0_BIAS = 127  # an E8M0 scale byte s means 2**(s - 127)


def quant_method(hf: dict, where: str) -> str | None:
    """The scheme ``config.json``'s ``quantization_config`` names (one of ``METHODS``), or None."""
    q = hf.get("quantization_config")
    if q is None:
        return None
    field = f"{where}: quantization_config"
    if not isinstance(q, dict):
        raise InteropError(f"{field}: not an object")
    method = q.get("quant_method")
    if method not in METHODS:
        raise InteropError(f"{field}.quant_method={method!r}: not supported (block-scaled fp8 or mxfp4)")
    return method


def block_size(hf: dict, where: str) -> tuple[int, int] | None:
    """The FP8 weight block of ``config.json``'s ``quantization_config``, or None (not FP8-quantized)."""
    if quant_method(hf, where) != "fp8":
        return None
    q, field = hf["quantization_config"], f"{where}: quantization_config"
    block = q.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise InteropError(f"{field}.weight_block_size={block!r}: two positive integers needed "
                           "(per-tensor fp8 scales are not supported)")
    fmt = q.get("fmt", "e4m3")
    if fmt not in ("e4m3", "e5m2"):
        raise InteropError(f"{field}.fmt={fmt!r}: not supported (e4m3 or e5m2)")
    return block[0], block[1]


class _Dequantized:
    """What a quantized folder shares: its ``quantized`` tensors read as float32, the rest as stored."""

    folder: SafetensorsFolder
    quantized: set | dict

    def kind(self, name: str) -> str:
        return "F32" if name in self.quantized else self.folder.kind(name)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(np.float32) if name in self.quantized else self.folder.dtype(name)


class BlockFp8Folder(_Dequantized):
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


class Mxfp4Folder(_Dequantized):
    """A ``SafetensorsFolder`` whose MXFP4 parameters read dequantized (float32): each ``P_blocks`` and
    ``P_scales`` pair is the one tensor ``P`` (``dequantize_mxfp4``), checked when the folder is
    opened (both uint8, ``[E, N, G, 16]`` and ``[E, N, G]``); the pair's own names are hidden."""

    def __init__(self, folder: SafetensorsFolder):
        self.folder = folder
        self.quantized: dict[str, tuple[int, ...]] = {}  # P: its dequantized shape
        for name in folder.names():
            if name.endswith(SCALES) and name.removesuffix(SCALES) + BLOCKS not in folder:
                raise InteropError(f"{folder.file(name)}: tensor {name}: MXFP4 scales without their "
                                   f"{name.removesuffix(SCALES) + BLOCKS}")
            if not name.endswith(BLOCKS):
                continue
            param = name.removesuffix(BLOCKS)
            scale, shape = param + SCALES, folder.shape(name)
            where = f"{folder.file(name)}: tensor {name}"
            if scale not in folder:
                raise InteropError(f"{where}: MXFP4 blocks without their {scale}")
            if param in folder:
                raise InteropError(f"{where}: MXFP4 blocks beside a tensor {param} of their own name")
            if folder.kind(name) != "U8":
                raise InteropError(f"{where}: MXFP4 blocks of dtype {folder.kind(name)}, expected U8")
            if len(shape) != 4 or shape[-1] != MXFP4_BYTES:
                raise InteropError(f"{where}: MXFP4 blocks of shape {list(shape)}, expected "
                                   f"[experts, rows, groups, {MXFP4_BYTES}] ({MXFP4_BYTES} bytes per 32 values)")
            if folder.kind(scale) != "U8" or folder.shape(scale) != shape[:-1]:
                raise InteropError(f"{folder.file(scale)}: tensor {scale}: {folder.kind(scale)} "
                                   f"{list(folder.shape(scale))}, expected U8 {list(shape[:-1])} "
                                   f"(one E8M0 scale per block of {name} {list(shape)})")
            experts, rows, groups, _ = shape
            self.quantized[param] = (experts, groups * 2 * MXFP4_BYTES, rows)
        self.stored = {c for p in self.quantized for c in (p + BLOCKS, p + SCALES)}

    def __contains__(self, name: str) -> bool:
        return name in self.quantized or (name in self.folder and name not in self.stored)

    def names(self) -> list[str]:
        return sorted([n for n in self.folder.names() if n not in self.stored] + list(self.quantized))

    def file(self, name: str):
        return self.folder.file(name + BLOCKS if name in self.quantized else name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.quantized[name] if name in self.quantized else self.folder.shape(name)

    def companions(self, name: str) -> tuple[str, ...]:
        """The tensors read for ``name`` (its blocks and scales)."""
        return (name + BLOCKS, name + SCALES) if name in self.quantized else ()

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.quantized:
            if name in self.stored:
                raise KeyError(name)
            return self.folder[name]
        return dequantize_mxfp4(self.folder[name + BLOCKS], self.folder[name + SCALES])


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 ``blocks`` (uint8 ``[E, N, G, 16]``) and ``scales`` (uint8 ``[E, N, G]``) as float32
    ``[E, G * 32, N]``: value ``2 * b`` of a block is byte ``b``'s low nibble, ``2 * b + 1`` its high,
    each times its block's ``2**(scale - 127)`` (exactly, as ``ldexp``: 0 stays 0 at scale 255), with
    the last two dimensions swapped; bit for bit transformers' ``convert_moe_packed_tensors`` in
    float32. Written one expert at a time, so the memory beyond the result is one expert's."""
    if (blocks.ndim != 4 or blocks.shape[-1] != MXFP4_BYTES or scales.shape != blocks.shape[:-1]
            or blocks.dtype != np.uint8 or scales.dtype != np.uint8):
        raise ValueError(f"MXFP4 blocks {blocks.dtype} {list(blocks.shape)} and scales {scales.dtype} "
                         f"{list(scales.shape)}: expected uint8 [E, N, G, {MXFP4_BYTES}] and uint8 [E, N, G]")
    experts, rows, groups, _ = blocks.shape
    out = np.empty((experts, groups * 2 * MXFP4_BYTES, rows), np.float32)
    for e in range(experts):  # values [N, G, 16, 2] -> [N, G, 32], times each block's scale
        values = FP4_PAIRS[blocks[e]].reshape(rows, groups, 2 * MXFP4_BYTES)
        with np.errstate(over="ignore"):  # exact, or inf past float32 (as torch.ldexp; never nan)
            np.ldexp(values, (scales[e].astype(np.int32) - E8M0_BIAS)[..., None], out=values)
        out[e] = values.reshape(rows, groups * 2 * MXFP4_BYTES).T
    return out


def open_folder(folder: SafetensorsFolder, hf: dict, where: str):
    """``folder`` as the importer reads it: dequantizing when ``config.json`` says it is quantized."""
    method = quant_method(hf, where)
    if method == "mxfp4":
        return Mxfp4Folder(folder)
    block = block_size(hf, where)
    return folder if block is None else BlockFp8Folder(folder, block)
