"""The train / validation split ``moe-data prepare`` makes of several files: by documents, close to
the asked fraction, deterministic.

The target is ``validation_fraction`` of the input's text (after ``max_bytes``; a text file's size,
a ``.jsonl`` file's documents measured). Files are walked in ``sources.held_out_order`` (the
SHA-256 of their relative path), each file's documents in file order: validation takes each whole
document that keeps it within 10% above the target, skips (leaves in train) one that would not,
and stops at the target (or once it has read as much text as the target past its first skip).
If the walk ends more than 10% short (a few huge documents), the first skipped document is cut on a character boundary so that validation meets the target, its rest
staying in train. Train is every other document in file order, capped at ``max_bytes`` less the
validation's text. One file is split by position, as the raw ``data.path`` does. The realised
share is in the index (``splits.validation.share``) and the summary.

The raw ``data.path`` of a training run keeps holding out whole files (its runs and checkpoints
stay valid), so only a single-file input gives the same splits prepared and raw.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Iterator

from train.data.config import DataConfig
from train.data.sources import capped, held_out_order, list_files, read_documents, split_sources

TOLERANCE = 0.1  # validation's text stays within this share of its target


@dataclasses.dataclass
class Taken:
    """What validation takes of one file: the documents ``whole`` and ``chars`` characters of document ``cut``."""

    whole: set[int] = dataclasses.field(default_factory=set)
    cut: int = -1
    chars: int = 0


def _text_bytes(file: pathlib.Path) -> int:
    """Text bytes of a file: its size, or for ``.jsonl`` its documents' (JSON escapes would count double)."""
    if file.suffix.lower() != ".jsonl":
        return file.stat().st_size
    return sum(len(doc.encode("utf-8")) for doc in read_documents(file))


@functools.lru_cache(maxsize=8)
def _target(files: tuple[pathlib.Path, ...], stamps: tuple, max_bytes: int, fraction: float) -> int:
    """Validation's share of the input's text (``stamps``: the files' sizes and times, for the cache)."""
    total = sum(_text_bytes(f) for f in files)
    return max(1, round((min(total, max_bytes) if max_bytes else total) * fraction))


def _cut(files: list[pathlib.Path], target: int) -> tuple[dict[int, Taken], int]:
    """What validation takes of each file, walking them in held-out order, and its text bytes: whole
    documents while they fit within the tolerance; if that falls short, the first one skipped is cut."""
    taken: dict[int, Taken] = {}
    got, skipped, looked = 0, None, 0  # looked: text read since the first skip, at most the target
    for i in held_out_order(files):
        for d, doc in enumerate(read_documents(files[i])):
            size = len(doc.encode("utf-8"))
            if got + size <= target * (1 + TOLERANCE):
                taken.setdefault(i, Taken()).whole.add(d)
                got += size
            elif skipped is None:
                skipped = (i, d, doc)
            looked += size if skipped else 0
            if got >= target:
                return taken, got
        if looked > target:
            break
    if skipped is not None and got < target * (1 - TOLERANCE):
        i, d, doc = skipped
        piece = doc.encode("utf-8")[: target - got].decode("utf-8", errors="ignore")
        part = taken.setdefault(i, Taken())
        part.cut, part.chars = d, len(piece)
        got += len(piece.encode("utf-8"))
    return taken, got


def _pieces(files: list[pathlib.Path], order, taken: dict[int, Taken], held: bool) -> Iterator[str]:
    """Validation's documents (``held``) or train's, file by file in ``order``."""
    for i in order:
        part = taken.get(i)
        if held and part is None:
            continue
        for d, doc in enumerate(read_documents(files[i])):
            if part is not None and d == part.cut:
                doc = doc[: part.chars] if held else doc[part.chars :]
            elif (part is not None and d in part.whole) != held:
                continue
            if doc:
                yield doc


def document_split(cfg: DataConfig, split: str) -> tuple[list[pathlib.Path], Iterator[str]]:
    """The files ``split`` reads from and its documents, in order (see the module docstring)."""
    files = list_files(cfg.path)
    if len(files) == 1 or split == "all":
        return split_sources(cfg, split)
    stamps = tuple((f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    taken, got = _cut(files, _target(tuple(files), stamps, cfg.max_bytes, cfg.validation_fraction))
    if split == "validation":
        order = [i for i in held_out_order(files) if i in taken]
        return [files[i] for i in order], _pieces(files, order, taken, held=True)
    budget = max(1, cfg.max_bytes - got) if cfg.max_bytes else 0
    return files, capped(_pieces(files, range(len(files)), taken, held=False), budget)
