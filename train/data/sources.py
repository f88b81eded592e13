"""Data sources -> documents -> token streams (batching lives in train/batches.py).

Shape letters: N tokens in a stream.

Sources (``data.path``): "" = the running Python's own standard library ``*.py`` files (nothing is
downloaded); a file; a folder (every non-hidden file below it); or a glob pattern. A ``.jsonl``
file holds one JSON object per line whose string "text" field is one document; any other file
is one document of UTF-8 text. Files are split into train / validation by a stable hash of
their relative path; a single file is split by position in its text instead. A split's token
stream is its documents in file order, each followed by ``eos``; ``data.max_bytes`` caps the text
read (shared between the splits by ``validation_fraction``). A folder that ``moe-data prepare``
wrote (an ``index.json`` and token shards) is not read here: ``train.data.prepared`` maps it.
"""

from __future__ import annotations

import codecs
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np

from train.data.config import DataConfig, fingerprint
from train.errors import DataError

if TYPE_CHECKING:
    from train.data.tokenizers import Tokenizer

SPLITS = ("train", "validation", "all")  # "all": every file, unsplit (scoring given data)
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages"})


def describe_path(path: str | None) -> str:
    if path is None:
        return "data.path"
    return f"data.path={path}" if path else 'data.path="" (the Python standard library)'


# ---------------------------------------------------------------- files and documents
def _walk(root: pathlib.Path, where: str, suffix: str = "", skip: frozenset[str] = frozenset()) -> list[pathlib.Path]:
    """Regular non-hidden files below ``root``, sorted by relative POSIX path."""

    def fail(err: OSError) -> None:
        raise DataError(f"{where}: cannot read {err.filename}: {err.strerror or err}")

    found: list[tuple[str, pathlib.Path]] = []  # (relative POSIX path, file)
    for folder, dirs, names in os.walk(root, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip]
        for name in names:
            file = pathlib.Path(folder, name)
            if name.startswith(".") or not name.endswith(suffix) or not _has_bytes(file):
                continue
            found.append((file.relative_to(root).as_posix(), file))
    return [file for _, file in sorted(found)]


def _has_bytes(file: pathlib.Path) -> bool:
    """A regular file with at least one byte (empty files hold no text and are skipped)."""
    try:
        return file.is_file() and file.stat().st_size > 0
    except OSError:
        return False


def list_files(path: str) -> list[pathlib.Path]:
    """The files ``data.path`` names (see the module docstring); none -> ``DataError``."""
    if not path:
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        files = _walk(root, describe_path(path), suffix=".py", skip=_STDLIB_SKIP)
        if not files:
            raise DataError(f"{describe_path(path)}: no *.py files in the standard library at {root}")
        return files
    where = describe_path(path)
    target = pathlib.Path(path).expanduser()
    try:
        if target.is_file():
            return [target]
        if target.is_dir():
            files = _walk(target, where)
            if not files:
                raise DataError(f"{where}: the folder has no (non-hidden, non-empty) files")
            return files
    except OSError as e:
        raise DataError(f"{where}: cannot read ({e.strerror or e})") from e
    if not any(c in path for c in "*?["):
        raise DataError(f"{where}: no such file or folder")
    matches = sorted(m for m in glob.glob(os.path.expanduser(path), recursive=True) if _has_bytes(pathlib.Path(m)))
    if not matches:
        raise DataError(f"{where}: no non-empty file matches this glob pattern")
    return [pathlib.Path(m) for m in matches]


def _read_jsonl(file: pathlib.Path, max_bytes: int) -> list[str]:
    docs: list[str] = []
    total = 0
    with open(file, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{file}:{lineno}: not valid JSON ({e.msg})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise DataError(f'{file}:{lineno}: expected a JSON object with a string "text" field')
            data = text.encode("utf-8", errors="replace")  # "replace": lone surrogates from "\ud800" escapes
            docs.append(data.decode("utf-8"))
            total += len(data)
            if max_bytes and total >= max_bytes:
                break
    return docs


def read_documents(file: pathlib.Path, *, max_bytes: int = 0) -> list[str]:
    """The documents of one file: each line's "text" for ``.jsonl``, else the whole file.

    ``max_bytes`` (0 = all) lets a reader stop early; callers still cap the text exactly.
    """
    file = pathlib.Path(file)
    try:
        if file.suffix.lower() == ".jsonl":
            return _read_jsonl(file, max_bytes)
        with open(file, "rb") as f:
            data = f.read(max_bytes) if max_bytes else f.read()
    except OSError as e:
        raise DataError(f"{file}: cannot read ({e.strerror or e})") from e
    truncated = bool(max_bytes) and len(data) == max_bytes
    text = codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=not truncated)
    return [text] if text else []


def _relative_names(files: Sequence[pathlib.Path]) -> list[str]:
    """POSIX paths relative to the files' common folder (independent of where that folder is)."""
    if len(files) == 1:
        return [pathlib.Path(files[0]).name]
    absolute = [os.path.abspath(f) for f in files]
    root = os.path.commonpath(absolute)
    return [pathlib.PurePath(os.path.relpath(a, root)).as_posix() for a in absolute]


def split_files(
    files: Sequence[pathlib.Path], validation_fraction: float
) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
    """(train, validation) files, each in input order; deterministic on every machine.

    The round(n * fraction) files (at least 1, at most n-1) with the smallest SHA-256 of their
    relative path (its bytes as the OS holds them: any file name works, UTF-8 or not) are held
    out. One file is returned for both; ``load_corpus`` splits its text.
    """
    files = list(files)
    if len(files) <= 1:
        return files, files
    k = min(len(files) - 1, max(1, int(len(files) * validation_fraction + 0.5)))
    held = set(held_out_order(files)[:k])
    return [f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held]


def held_out_order(files: Sequence[pathlib.Path]) -> list[int]:
    """Indices of ``files`` by the SHA-256 of their relative path: the order validation takes from."""
    names = _relative_names(files)
    return sorted(range(len(files)), key=lambda i: (hashlib.sha256(os.fsencode(names[i])).hexdigest(), names[i]))


def capped(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
    """Non-empty documents until ``max_bytes`` of UTF-8 text (0 = all); the last one cut."""
    remaining = max_bytes
    for doc in docs:
        if not doc:
            continue
        if max_bytes:
            data = doc.encode("utf-8")
            if len(data) >= remaining:
                doc = data[:remaining].decode("utf-8", errors="ignore")  # drops a cut character only
                if doc:
                    yield doc
                return
            remaining -= len(data)
        yield doc


def _split_by_position(docs: list[str], fraction: float, split: str) -> list[str]:
    """The train (first 1-fraction) or validation (rest) part of ``docs`` by character position."""
    total = sum(len(d) for d in docs)
    if total < 2:
        return docs
    cut = min(total - 1, max(1, int(total * (1 - fraction))))
    out, start = [], 0
    for doc in docs:
        end = start + len(doc)
        if split == "train":
            piece = doc[: cut - start] if start < cut else ""
        else:
            piece = doc[max(0, cut - start) :] if end > cut else ""
        if piece:
            out.append(piece)
        start = end
    return out


def _split_sources(cfg: DataConfig, split: str) -> tuple[list[pathlib.Path], Iterator[str]]:
    """The files of ``split`` and (lazily) its capped documents in file order."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}: choose one of {', '.join(SPLITS)}")
    files = list_files(cfg.path)
    if len(files) == 1:  # one file: cap its text as a whole, then split it by position
        docs = list(capped(read_documents(files[0], max_bytes=cfg.max_bytes), cfg.max_bytes))
        return files, iter(docs if split == "all" else _split_by_position(docs, cfg.validation_fraction, split))
    if split == "all":
        chosen, share = files, 1.0
    else:
        train, validation = split_files(files, cfg.validation_fraction)
        chosen = train if split == "train" else validation
        share = cfg.validation_fraction if split == "validation" else 1 - cfg.validation_fraction
    budget = max(1, round(cfg.max_bytes * share)) if cfg.max_bytes else 0

    def documents() -> Iterator[str]:
        read = 0
        for file in chosen:
            for doc in read_documents(file, max_bytes=budget - read if budget else 0):
                read += len(doc.encode("utf-8"))
                yield doc
            if budget and read >= budget:
                return

    return chosen, capped(documents(), budget)


def split_sources(cfg: DataConfig, split: str) -> tuple[list[pathlib.Path], Iterator[str]]:
    """The files of ``split`` and (lazily) its capped documents in file order: exactly what
    ``load_corpus`` tokenizes (``moe-data prepare`` reads its splits through this too)."""
    return _split_sources(cfg, split)


def corpus_texts(cfg: DataConfig, split: str = "train") -> Iterator[str]:
    """The documents of ``split`` (e.g. to train a BPE), capped like ``load_corpus``."""
    return _split_sources(cfg, split)[1]


@dataclasses.dataclass
class Corpus:
    tokens: np.ndarray  # int32 [N]; a prepared folder's: a lazily read batches.TokenSource
    num_bytes: int  # UTF-8 bytes of the text the tokens came from (for bits per byte)
    files: list[str]
    counts: np.ndarray | None = None  # int64 [V] occurrences of each id, when known without reading (prepared)


def load_corpus(cfg: DataConfig, tokenizer: Tokenizer, split: str, chunk: int = 512) -> Corpus:
    """The token stream of ``split``: every document in file order, each followed by eos."""
    files, docs = _split_sources(cfg, split)
    docs = list(docs)
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    pieces: list[np.ndarray] = []
    for start in range(0, len(docs), chunk):  # in chunks: a BPE's encodings are large
        for ids in tokenizer.encode_batch(docs[start : start + chunk]):
            pieces += [ids.astype(np.int32, copy=False), eos]
    if not pieces:
        raise empty_split_error(cfg, split, files)
    num_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    return Corpus(tokens=np.concatenate(pieces), num_bytes=num_bytes, files=[str(f) for f in files])


def empty_split_error(cfg: DataConfig, split: str, files: Sequence[pathlib.Path], where: str = "") -> DataError:
    """The error for a split without text (``where`` names the flag; default ``data.path=...``)."""
    where = where or describe_path(cfg.path)
    if split == "validation" and len(list_files(cfg.path)) > 1:  # split by files: these were held out
        shown = ", ".join(_printable(f) for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        return DataError(
            f"{where}: the validation split has no text: its held-out file(s) {shown} hold no documents; "
            f"raise data.validation_fraction (now {cfg.validation_fraction}) to hold out more files"
        )
    return DataError(f"{where}: the {split} split has no text")


def _printable(path) -> str:
    """A path for a message, whatever bytes its name holds."""
    return os.fsencode(str(path)).decode("utf-8", errors="backslashreplace")


FINGERPRINT_SAMPLE = 64 << 10  # bytes read from each end of every file


def _file_digest(path: pathlib.Path) -> str:
    """Size plus a hash of the first and last 64 KiB: catches edits without reading a large corpus."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(FINGERPRINT_SAMPLE)
        f.seek(max(size - FINGERPRINT_SAMPLE, len(head)))
        tail = f.read(FINGERPRINT_SAMPLE)
    return f"{size}:{hashlib.sha256(head + b'|' + tail).hexdigest()[:16]}"


def file_digests(path: str, where: str = "") -> list[list[str]]:
    """[relative path, size:hash of both ends] of every file ``path`` names (cheap on a large corpus)."""
    files = list_files(path)
    try:
        digests = [_file_digest(f) for f in files]
    except OSError as e:
        raise DataError(f"{where or describe_path(path)}: cannot read {e.filename} ({e.strerror or e})") from e
    return [[n, d] for n, d in zip(_relative_names(files), digests, strict=True)]


# DataConfig fields added after runs were fingerprinted: left out of the hash while at this default value
UNFINGERPRINTED_DEFAULTS = {"special_tokens": ""}


def data_fingerprint(cfg: DataConfig) -> str:
    """Short stable hash of the files (relative paths, sizes, both ends' contents) and the data settings."""
    settings = dataclasses.asdict(cfg)  # path, max_bytes, validation_fraction, tokenizer, ...
    for name, default in UNFINGERPRINTED_DEFAULTS.items():  # fields added later: at their default, runs keep their hash
        if settings.get(name) == default:
            settings.pop(name)
    return fingerprint({**settings, "files": file_digests(cfg.path)})
