"""The safetensors format, read lazily and written tensor by tensor, with numpy alone.

A ``.safetensors`` file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the raw bytes. Reading takes one tensor's bytes at a
time; writing plans every shard's header first and then streams the tensors in, so neither needs a
whole model in memory.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from typing import Callable, Iterable

import ml_dtypes
import numpy as np

from train.errors import DataError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
          "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX = "model.safetensors.index.json"


class SafetensorsFolder:
    """Every tensor of a Hugging Face model folder (``model.safetensors`` or the shards its index
    names), each read on demand: ``folder[name]`` reads that tensor alone."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = pathlib.Path(folder)
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise DataError(f"--hf_dir={self.folder}: no .safetensors files")
        self.where: dict[str, tuple[pathlib.Path, dict, int]] = {}
        for file in files:
            header, start = read_header(file)
            for name, info in header.items():
                if name != "__metadata__":
                    self.where[name] = (file, info, start)

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.where[name][1]["shape"])

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(DTYPES[self.where[name][1]["dtype"]])

    def __getitem__(self, name: str) -> np.ndarray:
        """The tensor, read from its file into memory of its own (freed with the array: a memory map
        would keep every page read resident in this process for as long as the map lives)."""
        file, info, start = self.where[name]
        begin, end = info["data_offsets"]
        dtype = np.dtype(DTYPES[info["dtype"]])
        with open(file, "rb") as f:
            f.seek(start + begin)
            raw = np.fromfile(f, dtype=dtype, count=(end - begin) // dtype.itemsize)
        return raw.reshape(info["shape"])


def read_header(file: pathlib.Path) -> tuple[dict, int]:
    """(the JSON header, the offset its data start at)."""
    try:
        with open(file, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise DataError(f"{file}: not a readable safetensors file ({e})") from None
    return header, 8 + n


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
