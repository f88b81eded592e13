"""The safetensors format, read lazily and written tensor by tensor, with numpy alone.

A ``.safetensors`` file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes. Reading takes one tensor's bytes at a
time; writing plans every shard's header first and then streams the tensors in, so neither needs a
whole model in memory.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from train.errors import DataError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
INDEX = "model.safetensors.index.json"
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit


class SafetensorsFolder:
    """Every tensor of a Hugging Face model folder (``model.safetensors`` or the shards its index
    names), each read on demand: ``folder[name]`` reads that tensor alone. Every header is checked
    when the folder is opened (``check_header``), so a tensor read later is the one it describes."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise DataError(f"--hf_dir={self.folder}: no .safetensors files")
        self.where: dict[str, tuple[pathlib.Path, dict, int]] = {}
        for file in files:
            header, start = read_header(file)
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if name in self.where:
                    raise DataError(f"{file}: tensor {name} is also in {self.where[name][0]}")
                self.where[name] = (file, info, start)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return sorted(self.where)

    def file(self, name: str) -> pathlib.Path:
        return self.where[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name][1]["shape"])

    def kind(self, name: str) -> str:
        """The header's dtype name ("F32", "BF16", "I32"...)."""
        return self.where[name][1]["dtype"]

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self.kind(name)])

    def companions(self, name: str) -> tuple[str, ...]:
        """The tensors read with ``name`` (none here; a quantized folder's block scales)."""
        return ()

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor, read from its file into memory of its own (freed with the array: a memory map
        would keep every page read resident in this process for as long as the map lives)."""
        file, info, start = self.where[name]
        begin, end = info["data_offsets"]
        dtype = self.dtype(name)
        count = (end - begin) // dtype.itemsize
        with open(file, "rb") as f:
            f.seek(start + begin)
            raw = np.fromfile(f, dtype=dtype, count=count)
        if raw.size != count:
            raise DataError(f"{file}: tensor {name}: {raw.size * dtype.itemsize} of its {end - begin} bytes "
                            "could be read (the file changed or is truncated)")
        return raw.reshape(info["shape"])


def read_header(file: pathlib.Path) -> tuple[dict, int]:
    """(the JSON header, checked by ``check_header``, the offset its data start at)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise DataError(f"{file}: not a safetensors file ({size} bytes, shorter than the 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise DataError(f"{file}: header length {n} exceeds the file ({size} bytes) or the "
                                f"{MAX_HEADER_BYTES >> 20} MiB limit (truncated or not a safetensors file)")
            text = f.read(n)
    except OSError as e:
        raise DataError(f"{file}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(text)
    except ValueError as e:
        raise DataError(f"{file}: the header is not JSON ({str(e)[:200]})") from None
    if not isinstance(header, dict):
        raise DataError(f"{file}: the header is a JSON {type(header).__name__}, not an object")
    check_header(file, header, size - 8 - n)
    return header, 8 + n


def check_header(file: pathlib.Path, header: dict, data_bytes: int) -> None:
    """Every tensor's dtype is known, its shape a list of sizes, and its ``data_offsets`` span exactly
    its bytes inside the file's ``data_bytes``, no two overlapping; ``DataError`` naming it otherwise."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"{file}: tensor {name}"
        if not isinstance(info, dict):
            raise DataError(f"{where}: its header entry is a {type(info).__name__}, not an object")
        kind, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(kind, str) or kind not in DTYPES:
            raise DataError(f"{where}: dtype {kind!r} is not supported ({', '.join(DTYPES)})")
        if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
            raise DataError(f"{where}: shape {shape!r} is not a list of sizes")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise DataError(f"{where}: data_offsets {offsets!r} are not a range inside the file's {data_bytes} "
                            "data bytes (a truncated file?)")
        need = math.prod(shape) * np.dtype(DTYPES[kind]).itemsize
        if offsets[1] - offsets[0] != need:
            raise DataError(f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes, but {kind} {shape} "
                            f"is {need} bytes")
        spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise DataError(f"{file}: tensors {first} and {second} overlap (data bytes {begin}..{end})")


def write_shards(folder: pathlib.Path, plan: list[tuple[str, tuple[int, ...], np.dtype]],
                 produce: Callable[[], Iterable[tuple[str, np.ndarray]]], max_shard_bytes: int) -> list[str]:
    """Write the tensors of ``plan`` ((name, shape, dtype) in the order ``produce`` yields them) to
    ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` (a single
    ``model.safetensors`` when one is enough) and, for several, the index; returns the file names."""
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for name, shape, dtype in plan:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape, dtype))
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1
             else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    tensors = iter(produce())
    weight_map, total = {}, 0
    for file, shard in zip(names, shards, strict=True):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in shard:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": NAMES[np.dtype(dtype)], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        with open(folder / file, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for name, shape, dtype in shard:
                got_name, array = next(tensors)
                if got_name != name or tuple(array.shape) != tuple(shape):
                    raise RuntimeError(f"safetensors writer: expected {name} {shape}, got {got_name} {array.shape}")
                f.write(np.ascontiguousarray(array, dtype=dtype).tobytes())
        total += offset
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2))
    return names
