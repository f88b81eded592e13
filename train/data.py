"""Corpus -> tokens -> Grain pipeline: deterministic, checkpointable, sharded per process.

Shape letters: N tokens in a stream, R records, G global batch, B local batch (G / processes),
S sequence length (``train.seq_len``).

Sources (``data.path``): "" = the running Python's own standard library ``*.py`` files (nothing is
downloaded); a file; a folder (every non-hidden file below it); or a glob pattern. A ``.jsonl``
file holds one JSON object per line whose string "text" field is one document; any other file
is one document of UTF-8 text. Files are split into train / validation by a stable hash of
their relative path; a single file is split by position in its text instead. A split's token
stream is its documents in file order, each followed by ``eos``; ``data.max_bytes`` caps the text
read (shared between the splits by ``validation_fraction``).

Training records are non-overlapping windows of S+1 tokens with stride S (the last token of one
record is the first of the next). Epoch e is a permutation of all R records drawn from the seed
and e (Grain's epoch-aware index shuffle). Global batch b is records [b*G, (b+1)*G) of that
endless shuffled sequence; process p reads only rows [p*B, (p+1)*B) of it. The iterator state is
the next batch index (plus what must match on resume), so resuming is exact and cheap.
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

import grain
import numpy as np

from train.config import DataConfig, fingerprint

if TYPE_CHECKING:
    from train.tokenizer import Tokenizer

SPLITS = ("train", "validation", "all")  # "all": every file, unsplit (scoring given data)
_STDLIB_SKIP = frozenset({"site-packages", "dist-packages"})


class DataError(ValueError):
    """A user-caused data problem; the message starts with the path or config field."""


def _where(path: str | None) -> str:
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
            if name.startswith(".") or not name.endswith(suffix) or not file.is_file():
                continue
            found.append((file.relative_to(root).as_posix(), file))
    return [file for _, file in sorted(found)]


def list_files(path: str) -> list[pathlib.Path]:
    """The files ``data.path`` names (see the module docstring); none -> ``DataError``."""
    if not path:
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        files = _walk(root, _where(path), suffix=".py", skip=_STDLIB_SKIP)
        if not files:
            raise DataError(f"{_where(path)}: no *.py files in the standard library at {root}")
        return files
    where = _where(path)
    target = pathlib.Path(path).expanduser()
    try:
        if target.is_file():
            return [target]
        if target.is_dir():
            files = _walk(target, where)
            if not files:
                raise DataError(f"{where}: the folder has no (non-hidden) files")
            return files
    except OSError as e:
        raise DataError(f"{where}: cannot read ({e.strerror or e})") from e
    if not any(c in path for c in "*?["):
        raise DataError(f"{where}: no such file or folder")
    matches = sorted(m for m in glob.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(m))
    if not matches:
        raise DataError(f"{where}: no file matches this glob pattern")
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
    relative path are held out. One file is returned for both; ``load_corpus`` splits its text.
    """
    files = list(files)
    if len(files) <= 1:
        return files, files
    names = _relative_names(files)
    k = min(len(files) - 1, max(1, int(len(files) * validation_fraction + 0.5)))
    ranked = sorted(range(len(files)), key=lambda i: (hashlib.sha256(names[i].encode()).hexdigest(), names[i]))
    held = set(ranked[:k])
    return [f for i, f in enumerate(files) if i not in held], [f for i, f in enumerate(files) if i in held]


def _capped(docs: Iterable[str], max_bytes: int) -> Iterator[str]:
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
        docs = list(_capped(read_documents(files[0], max_bytes=cfg.max_bytes), cfg.max_bytes))
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

    return chosen, _capped(documents(), budget)


def corpus_texts(cfg: DataConfig, split: str = "train") -> Iterator[str]:
    """The documents of ``split`` (e.g. to train a BPE), capped like ``load_corpus``."""
    return _split_sources(cfg, split)[1]


@dataclasses.dataclass
class Corpus:
    tokens: np.ndarray  # int32 [N]
    num_bytes: int  # UTF-8 bytes of the text the tokens came from (for bits per byte)
    files: list[str]


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
        raise DataError(f"{_where(cfg.path)}: the {split} split has no text")
    num_bytes = sum(len(doc.encode("utf-8")) for doc in docs)
    return Corpus(tokens=np.concatenate(pieces), num_bytes=num_bytes, files=[str(f) for f in files])


def data_fingerprint(cfg: DataConfig) -> str:
    """Short stable hash of the files (relative paths + sizes) and the data settings."""
    files = list_files(cfg.path)
    try:
        sizes = [f.stat().st_size for f in files]
    except OSError as e:
        raise DataError(f"{_where(cfg.path)}: cannot read {e.filename} ({e.strerror or e})") from e
    settings = dataclasses.asdict(cfg)  # path, max_bytes, validation_fraction, tokenizer, ...
    return fingerprint({**settings, "files": [[name, size] for name, size in zip(_relative_names(files), sizes, strict=True)]})


# ---------------------------------------------------------------- batches
def _check_batching(global_batch: int, seq_len: int, process_index: int, process_count: int) -> int:
    """The local batch size B = G / processes; bad arguments raise ``ValueError``."""
    if seq_len < 1:
        raise ValueError(f"train.seq_len={seq_len}: must be >= 1")
    if global_batch < 1:
        raise ValueError(f"train.batch_size={global_batch}: must be >= 1")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index}, process_count={process_count}: out of range")
    if global_batch % process_count:
        raise ValueError(f"train.batch_size={global_batch}: not divisible by the {process_count} processes")
    return global_batch // process_count


_MUST_MATCH = {"seq_len": "train.seq_len", "global_batch": "train.batch_size", "num_records": "data.path"}


def _shuffle_seed(seed: int) -> int:
    """A 32-bit Grain shuffle seed from any integer (epoch e then uses this + e)."""
    return int.from_bytes(hashlib.sha256(f"switchyard.data:{int(seed)}".encode()).digest()[:4], "little")


class TrainBatches:
    """Deterministic, checkpointable, process-sharded training batches over a ``grain.MapDataset``.

    ``next(it)`` / ``it.batch(b)`` give ``{"inputs": int32 [B,S], "targets": int32 [B,S]}``.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        *,
        data_path: str | None = None,
    ) -> None:
        self.local_batch = _check_batching(global_batch, seq_len, process_index, process_count)
        self._tokens_N = np.asarray(tokens, dtype=np.int32)
        if self._tokens_N.ndim != 1:
            raise ValueError(f"tokens: expected a 1-D array, got shape {self._tokens_N.shape}")
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.process_index = process_index
        self.process_count = process_count
        self.num_records = (self._tokens_N.size - 1) // seq_len
        if self.num_records < 1:
            raise DataError(
                f"{_where(data_path)}: {self._tokens_N.size} tokens, fewer than train.seq_len+1={seq_len + 1}"
            )
        self._next = 0
        self._use_seed(seed)

    def _use_seed(self, seed: int) -> None:
        self.seed = int(seed)
        # Record ids, epoch after epoch, each epoch a fresh permutation; then the token windows.
        order = grain.MapDataset.range(self.num_records).shuffle(seed=_shuffle_seed(seed)).repeat()
        self._records = order.map(self._window)

    def _window(self, record: int) -> np.ndarray:
        start = record * self.seq_len
        return self._tokens_N[start : start + self.seq_len + 1]  # [S+1]

    def batch(self, index: int) -> dict[str, np.ndarray]:
        """Local batch ``index`` (random access; does not move the iterator)."""
        if index < 0:
            raise IndexError(f"batch index {index}: must be >= 0")
        first = index * self.global_batch + self.process_index * self.local_batch
        rows_BS1 = np.stack([self._records[i] for i in range(first, first + self.local_batch)])  # [B,S+1]
        return {"inputs": np.ascontiguousarray(rows_BS1[:, :-1]), "targets": np.ascontiguousarray(rows_BS1[:, 1:])}

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        out = self.batch(self._next)
        self._next += 1
        return out

    def get_state(self) -> dict:
        """JSON-serialisable position; the same on every process."""
        return {"next_batch": self._next, "seed": self.seed, **{key: getattr(self, key) for key in _MUST_MATCH}}

    def set_state(self, state: dict) -> None:
        """Continue exactly after the batch at which ``get_state()`` returned ``state``."""
        for key, field in _MUST_MATCH.items():
            if int(state.get(key, getattr(self, key))) != getattr(self, key):
                raise DataError(f"{field}: the data state to resume has {key}={state[key]}, not {getattr(self, key)}")
        if int(state.get("seed", self.seed)) != self.seed:
            self._use_seed(int(state["seed"]))
        next_batch = int(state["next_batch"])
        if next_batch < 0:
            raise ValueError(f"next_batch={next_batch}: must be >= 0")
        self._next = next_batch


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    global_batch: int,
    max_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    *,
    data_path: str | None = None,
) -> list[dict[str, np.ndarray]]:
    """Validation batches: consecutive windows from the start, no shuffle.

    Row r of the stream predicts tokens [r*S+1, r*S+S] (inputs are the S tokens before). With
    ``max_batches`` = 0 the whole stream is covered: the last window may be partial and the last
    global batch is filled with pad rows, their ``weights`` 0, so each predicted token is scored
    exactly once. Each dict: inputs, targets int32 [B,S]; weights float32 [B,S].
    """
    local = _check_batching(global_batch, seq_len, process_index, process_count)
    tokens_N = np.asarray(tokens, dtype=np.int32).reshape(-1)
    num_targets = tokens_N.size - 1
    if num_targets < 1:
        raise DataError(f"{_where(data_path)}: the validation split has {tokens_N.size} tokens, need at least 2")
    num_rows = -(-num_targets // seq_len)
    num_batches = -(-num_rows // global_batch)
    if max_batches > 0:
        num_batches = min(num_batches, max_batches)
    out = []
    for b in range(num_batches):
        inputs_BS = np.zeros((local, seq_len), dtype=np.int32)
        targets_BS = np.zeros((local, seq_len), dtype=np.int32)
        weights_BS = np.zeros((local, seq_len), dtype=np.float32)
        for j in range(local):
            start = (b * global_batch + process_index * local + j) * seq_len
            n = min(seq_len, num_targets - start)
            if n <= 0:
                continue  # a pad row
            inputs_BS[j, :n] = tokens_N[start : start + n]
            targets_BS[j, :n] = tokens_N[start + 1 : start + n + 1]
            weights_BS[j, :n] = 1.0
        out.append({"inputs": inputs_BS, "targets": targets_BS, "weights": weights_BS})
    return out
