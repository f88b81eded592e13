"""What a prepared folder's index records about each shard, and how a shard is checked against it.

Shape letters: N tokens, V ids of the tokenizer.

Each shard's record holds, besides its file, token count, bytes and SHA-256, the largest token id
it holds (``max_id``) and a histogram of its ids (``counts``: the int64 [V] counts, little-endian,
zlib-compressed and base64-encoded, a few bytes per id used). ``moe-data prepare`` computes both
while it writes the shard; they cost nothing to read back:

* ``max_id`` is checked against the vocabulary whenever a folder is opened;
* the histograms, summed, are a split's token counts (``split_counts``), which routers that fit a
  table (``stable``, ``balanced_hash``) need at start-up: no token is read for them.

``check_shard`` reads a shard and compares its size, SHA-256, largest id and histogram with the
record (``moe-data verify`` checks every shard; a run's start checks ``sample_shards``).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import pathlib
import zlib

import numpy as np

BLOCK_BYTES = 16 << 20  # read a shard this many bytes at a time: memory stays flat
VERIFY_ALL_BYTES = 256 << 20  # a split whose shards hold at most this many bytes is verified whole at a start


def encode_counts(counts_V: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.asarray(counts_V, dtype="<i8").tobytes(), 6)).decode("ascii")


def decode_counts(text: str, vocab_size: int) -> np.ndarray:
    """int64 [V] from ``encode_counts``'s text; a damaged value raises ``ValueError``."""
    try:
        counts_V = np.frombuffer(zlib.decompress(base64.b64decode(text, validate=True)), dtype="<i8")
    except (zlib.error, ValueError, TypeError) as e:
        raise ValueError(f"not a histogram ({e})") from None
    if counts_V.shape != (vocab_size,):
        raise ValueError(f"a histogram of {counts_V.size} ids, not {vocab_size}")
    return counts_V.astype(np.int64)


class ShardStats:
    """The SHA-256, largest id and histogram of the tokens given to ``update``, block by block."""

    def __init__(self, vocab_size: int, ids: bool = True) -> None:
        self.vocab_size, self.ids = vocab_size, ids  # ids=False: the SHA-256 only
        self.sha = hashlib.sha256()
        self.max_id = -1
        self.counts_V = np.zeros((vocab_size,), dtype=np.int64)
        self.tokens = 0

    def update(self, tokens_N: np.ndarray) -> None:
        self.sha.update(tokens_N.tobytes())
        if self.ids and len(tokens_N):
            self.max_id = max(self.max_id, int(tokens_N.max()))
            self.counts_V += np.bincount(tokens_N, minlength=self.vocab_size)[: self.vocab_size]
        self.tokens += len(tokens_N)

    def record(self) -> dict:
        return {"sha256": self.sha.hexdigest(), "max_id": self.max_id, "counts": encode_counts(self.counts_V)}


def read_stats(file: pathlib.Path, dtype: str, vocab_size: int, ids: bool = True) -> ShardStats:
    """The stats of a shard file, read in blocks (``OSError`` when it cannot be read)."""
    stats, itemsize = ShardStats(vocab_size, ids), np.dtype(dtype).itemsize
    with open(file, "rb") as f:
        while block := f.read(BLOCK_BYTES - BLOCK_BYTES % itemsize):
            stats.update(np.frombuffer(block[: len(block) - len(block) % itemsize], dtype=np.dtype(dtype).newbyteorder("<")))
    return stats


def size_problem(name: str, size: int, record: dict, itemsize: int) -> str | None:
    """Why a shard of ``size`` bytes does not match its record, saying what was compared; None if it does."""
    expected = int(record["tokens"]) * itemsize
    if size != expected:
        return (f"shard {name} has {size} bytes; index.json says {record['tokens']} tokens of {itemsize} bytes "
                f"= {expected} bytes")
    if size != int(record["bytes"]):
        return f"shard {name} has {size} bytes; index.json's bytes field says {record['bytes']}"
    return None


def check_shard(folder: pathlib.Path, record: dict, dtype: str, vocab_size: int, full: bool) -> str | None:
    """One line on what is wrong with a shard (None: nothing): its SHA-256, and with ``full`` also
    the ids it holds (largest id, histogram) read from the data itself."""
    name = record["file"]
    try:
        size = (folder / name).stat().st_size
        problem = size_problem(name, size, record, np.dtype(dtype).itemsize)
        if problem:
            return problem
        stats = read_stats(folder / name, dtype, vocab_size, ids=full)
    except OSError as e:
        return f"shard {name} cannot be read ({e.strerror or e})"
    if stats.sha.hexdigest() != record["sha256"]:
        return f"shard {name}: its SHA-256 is not the one index.json records (the file changed after it was written)"
    if full and stats.max_id >= vocab_size:
        return f"shard {name} holds token id {stats.max_id}, outside the vocabulary of {vocab_size} ids"
    if full and not np.array_equal(stats.counts_V[:vocab_size], decode_counts(record["counts"], vocab_size)):
        return f"shard {name}: its token histogram is not the one index.json records"
    return None


def sample_shards(shards: list[dict], fingerprint: str, today: datetime.date | None = None) -> list[dict]:
    """The shards a run's start verifies: all of them when they hold at most ``VERIFY_ALL_BYTES``, else
    the first, the last and one more chosen by the index fingerprint and the date (the same on every
    process of a job, another one each day)."""
    if sum(int(s["bytes"]) for s in shards) <= VERIFY_ALL_BYTES:
        return list(shards)
    today = today or datetime.datetime.now(datetime.timezone.utc).date()
    pick = int.from_bytes(hashlib.sha256(f"{fingerprint}:{today.isoformat()}".encode()).digest()[:8], "little")
    chosen = {0, len(shards) - 1, pick % len(shards)}
    return [shards[k] for k in sorted(chosen)]


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:05d}.bin"


class ShardWriter:
    """Appends tokens to ``split``'s shards; ``on_shard(record)`` after each one is renamed into place.

    A shard is written as ``.NAME.tmp``, synced and renamed; its record holds the file, tokens, bytes,
    SHA-256, largest id and histogram, and ``next``: where the stream goes on (``position``'s counters)."""

    def __init__(self, folder: pathlib.Path, split: str, first: int, shard_tokens: int, vocab_size: int,
                 on_shard) -> None:
        self.folder, self.split, self.k, self.shard_tokens, self.on_shard = folder, split, first, shard_tokens, on_shard
        self.vocab_size = vocab_size
        self._file, self._stats = None, None

    def _tmp(self) -> pathlib.Path:
        return self.folder / f".{shard_name(self.split, self.k)}.tmp"

    def write(self, tokens_N: np.ndarray, chunk: int, skipped: int, before: dict) -> None:
        """Tokens of ``chunk`` (its first ``skipped`` already in earlier shards); ``before``: the
        counters (text bytes, documents, ...) of the chunks before it."""
        pos = 0
        while pos < len(tokens_N):
            if self._file is None:
                self._file, self._stats = open(self._tmp(), "wb"), ShardStats(self.vocab_size)
            take = min(len(tokens_N) - pos, self.shard_tokens - self._stats.tokens)
            part_N = tokens_N[pos : pos + take]
            self._file.write(part_N.tobytes())
            self._stats.update(part_N)
            pos += take
            if self._stats.tokens == self.shard_tokens:
                self._finish({"chunk": chunk, "offset": skipped + pos, **before})

    def close(self, totals: dict) -> None:
        if self._file is not None:
            self._finish({"chunk": None, **totals})

    def _finish(self, next_position: dict) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        name = shard_name(self.split, self.k)
        os.replace(self._tmp(), self.folder / name)
        size = (self.folder / name).stat().st_size
        self.on_shard({"file": name, "tokens": self._stats.tokens, "bytes": size, **self._stats.record(),
                       "next": next_position})
        self.k, self._file, self._stats = self.k + 1, None, None
