"""Prepared data: a corpus tokenized once (``moe-data prepare``) and read by memory map.

Shape letters: N tokens in a stream, K shards.

A prepared folder DIR holds:

    index.json                format and version, dtype, the tokenizer, the settings and source
                              fingerprint, and per split: its shards (file, tokens, bytes, sha256,
                              largest id, histogram of ids: ``train.data.shards``), token count,
                              text bytes, document count and eos id
    train-00000.bin ...       the train split's tokens in stream order, ``shard_tokens`` per shard
    validation-00000.bin ...  the validation split's
    tokenizer.json            a Hugging Face tokenizer (the BPE trained by prepare, or a pretrained
                              one), or tokenizer.model (SentencePiece), or tokenizer.txt (a note:
                              the byte tokenizer has no file)

Why raw ``.bin`` shards, little-endian uint16 (a vocabulary of at most 65,536 ids) else uint32,
read with ``np.memmap``: no extra dependency (ArrayRecord would add one, and it stores records as
separately serialised blobs, so a window of S+1 tokens that spans records costs several reads and
decodes); random access by offset (token i of a shard is at byte i * itemsize, so a training
window is one slice of one or two shards, and opening a split reads nothing but ``index.json``);
and a memory map shares its pages through the page cache between every process of a host, each
process faulting in only the pages of its own rows. ``.npy`` would only add a header: the dtype
and the lengths are in the index.

A split's stream equals what ``sources.load_corpus`` gives for the same input and tokenizer (every
document in file order followed by eos, split the same way), so a prepared folder trains on the
same batches as the raw text it came from.

For a run, ``open_run_data`` opens either kind of ``data.path``; for a prepared folder the
folder's tokenizer and preparation settings are the run's (its config records them), and a
setting that contradicts them is refused in one line.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from train.data.config import DataConfig, fingerprint
from train.data.batches import TokenSource
from train.data.shards import check_shard, decode_counts, sample_shards, shard_name, size_problem
from train.data.sources import Corpus, corpus_texts, data_fingerprint, describe_path, load_corpus
from train.data.tokenizers import (
    BPETokenizer,
    ByteTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer_file,
)
from train.errors import DataError

FORMAT = "switchyard.prepared"
VERSION = 2  # 2: each shard's largest id and histogram; the validation split by documents
INDEX = "index.json"
PROGRESS = "progress.json"  # only in an unfinished DIR.partial
SPLITS = ("train", "validation")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
BYTE_NOTE = "tokenizer.txt"


def token_dtype(vocab_size: int) -> str:
    """The shards' dtype: uint16 when every id fits, else uint32 (little-endian either way)."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def tokenizer_identity(tokenizer: Tokenizer) -> str:
    """What makes two tokenizers give the same ids: the kind, plus a hash of its file's contents."""
    if isinstance(tokenizer, ByteTokenizer):
        return "byte"
    if isinstance(tokenizer, BPETokenizer):
        return "hf:" + hashlib.sha256(tokenizer.to_json().encode()).hexdigest()[:16]
    if isinstance(tokenizer, SentencePieceTokenizer):
        return "spm:" + hashlib.sha256(tokenizer.model_proto).hexdigest()[:16]
    raise TypeError(f"{type(tokenizer).__name__}: unknown tokenizer kind")


def is_prepared(path: str) -> bool:
    """Whether ``path`` is a prepared folder, or what is left of one (then opening it says why not)."""
    if not path:
        return False
    folder = pathlib.Path(path).expanduser()
    try:
        if not folder.is_dir():
            return False
        if (folder / shard_name("train", 0)).is_file() or (folder / PROGRESS).is_file():
            return True
        index = folder / INDEX
        if not index.is_file():
            return False
        with open(index, "rb") as f:
            return FORMAT.encode() in f.read(4096)  # a raw text folder may hold an unrelated index.json
    except OSError:
        return False


class ShardedTokens(TokenSource):
    """One split's token stream over its shards: ``len`` and slices (spanning shards) as int arrays.

    Each shard is memory-mapped when first touched; a slice reads only its own pages.
    """

    def __init__(self, files: Sequence[pathlib.Path], counts: Sequence[int], dtype: str) -> None:
        self._files = [pathlib.Path(f) for f in files]
        self._counts = [int(c) for c in counts]
        self._dtype = np.dtype(dtype).newbyteorder("<")
        self._starts_K1 = np.concatenate([[0], np.cumsum(self._counts, dtype=np.int64)])  # [K+1] first token of each
        self._maps: dict[int, np.memmap] = {}

    def __len__(self) -> int:
        return int(self._starts_K1[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def _shard(self, k: int) -> np.memmap:
        if k not in self._maps:
            self._maps[k] = np.memmap(self._files[k], dtype=self._dtype, mode="r", shape=(self._counts[k],))
        return self._maps[k]

    def __getitem__(self, index):
        n = len(self)
        if isinstance(index, (int, np.integer)):
            i = int(index) + (n if index < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"token {index}: out of range for {n} tokens")
            k = int(np.searchsorted(self._starts_K1, i, side="right")) - 1
            return self._shard(k)[i - self._starts_K1[k]]
        if not isinstance(index, slice):
            raise TypeError(f"{type(index).__name__}: index a token stream with an int or a slice")
        start, stop, step = index.indices(n)
        if step != 1:
            raise ValueError("a token stream is sliced with step 1 only")
        pieces, pos = [], start
        while pos < stop:
            k = int(np.searchsorted(self._starts_K1, pos, side="right")) - 1
            end = min(stop, int(self._starts_K1[k + 1]))
            pieces.append(self._shard(k)[pos - self._starts_K1[k] : end - self._starts_K1[k]])
            pos = end
        if not pieces:
            return np.zeros((0,), self._dtype)
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


@dataclasses.dataclass
class Prepared:
    """An opened prepared folder; ``where`` names it in messages (``data.path=DIR``)."""

    path: pathlib.Path
    index: dict
    where: str

    @property
    def fingerprint(self) -> str:
        return fingerprint({"prepared": self.index["fingerprint"]})

    @property
    def settings(self) -> dict:
        return self.index["settings"]

    def corpus(self, split: str) -> Corpus:
        """The token stream of ``split`` (``all``: train then validation), memory-mapped."""
        names = SPLITS if split == "all" else (split,)
        shards = [s for name in names for s in self.index["splits"][name]["shards"]]
        files = [self.path / s["file"] for s in shards]
        tokens = ShardedTokens(files, [s["tokens"] for s in shards], self.index["dtype"])
        num_bytes = sum(self.index["splits"][name]["text_bytes"] for name in names)
        vocab = self.index["tokenizer"]["vocab_size"]
        counts_V = sum((decode_counts(s["counts"], vocab) for s in shards), np.zeros((vocab,), np.int64))
        return Corpus(tokens=tokens, num_bytes=num_bytes, files=[str(f) for f in files], counts=counts_V)

    def problems(self, full: bool = True) -> list[str]:
        """One line per shard that does not match the index (``full``: every shard, its ids read too;
        else the SHA-256 of ``shards.sample_shards`` of each split)."""
        dtype, vocab = self.index["dtype"], self.index["tokenizer"]["vocab_size"]
        found = []
        for split in SPLITS:
            shards = self.index["splits"][split]["shards"]
            for shard in shards if full else sample_shards(shards, self.index["fingerprint"]):
                problem = check_shard(self.path, shard, dtype, vocab, full)
                if problem:
                    found.append(f"{self.where}: {problem}")
        return found

    def check_sample(self) -> None:
        """At a start: ``DataError`` naming the first sampled shard whose SHA-256 does not match."""
        found = self.problems(full=False)
        if found:
            raise DataError(f"{found[0]}; run moe-data verify --data={self.path} to check every shard, "
                            "and prepare the folder again")

    def tokenizer(self) -> Tokenizer:
        info = self.index["tokenizer"]
        file = info.get("file")
        try:
            tokenizer = ByteTokenizer() if file is None else load_tokenizer_file(self.path / file, "tokenizer")
        except DataError as e:
            raise DataError(f"{self.where}: {e}") from None
        if tokenizer_identity(tokenizer) != info["identity"]:
            raise DataError(f"{self.where}: {file} is not the tokenizer the shards were made with (index.json "
                            f"says {info['identity']}); prepare the folder again")
        return tokenizer

    def resolve(self, cfg: DataConfig, log: Callable[[str], None]) -> DataConfig:
        """``cfg`` with the data settings the folder was prepared with; a contradiction -> ``DataError``."""
        info, kind = self.index["tokenizer"], self.index["tokenizer"]["kind"]
        if cfg.tokenizer_path:
            raise DataError(f"data.tokenizer_path={cfg.tokenizer_path}: {self.where} is a prepared folder with its "
                            f"own tokenizer ({info['file'] or kind}); drop data.tokenizer_path, or prepare again "
                            f"with --tokenizer={cfg.tokenizer_path}")
        if cfg.tokenizer == "bpe" and kind == "byte":
            raise DataError(f"data.tokenizer=bpe: {self.where} was prepared with the byte tokenizer; drop "
                            "data.tokenizer, or prepare again with --tokenizer=bpe")
        s = self.settings
        resolved = dataclasses.replace(
            cfg, tokenizer="byte" if kind == "byte" else "bpe", max_bytes=s["max_bytes"],
            validation_fraction=s["validation_fraction"],
            bpe_vocab_size=s["tokenizer"].get("bpe_vocab_size", cfg.bpe_vocab_size),
        )
        changed = [f"data.{k}={getattr(cfg, k)!r} -> {getattr(resolved, k)!r}"
                   for k in ("tokenizer", "bpe_vocab_size", "validation_fraction", "max_bytes")
                   if getattr(cfg, k) != getattr(resolved, k)]
        if changed:
            log(f"{self.where}: a prepared folder; its preparation settings apply: {', '.join(changed)}")
        return resolved

    def copy_tokenizer(self, workdir: pathlib.Path) -> None:
        """Put the folder's tokenizer file in ``workdir`` (where moe-eval and moe-generate look)."""
        file = self.index["tokenizer"].get("file")
        if file is None:
            return
        data = (self.path / file).read_bytes()
        target = pathlib.Path(workdir) / file
        if not target.is_file() or target.read_bytes() != data:
            tmp = target.with_name(f".{file}.tmp.{os.getpid()}")
            tmp.write_bytes(data)
            os.replace(tmp, target)
        for other in TOKENIZER_FILES:  # a tokenizer.json left there would be read before a .model
            if other != file:
                (pathlib.Path(workdir) / other).unlink(missing_ok=True)

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        """Refuse to score with a tokenizer other than the one the shards were made with."""
        mine, theirs = self.index["tokenizer"]["identity"], tokenizer_identity(tokenizer)
        if mine != theirs:
            raise DataError(f"{self.where}: prepared with the tokenizer {mine} ({self.index['tokenizer']['file'] or 'byte'}), "
                            f"but the run uses {theirs}; prepare it with --tokenizer=WORKDIR/tokenizer.json")


def open_prepared(path: str | os.PathLike, where: str = "") -> Prepared:
    """Open a prepared folder: reads ``index.json`` and checks every shard's size and largest id
    (no data read)."""
    folder = pathlib.Path(path).expanduser()
    where = where or describe_path(str(path))
    index_file = folder / INDEX
    if not folder.is_dir():
        raise DataError(f"{where}: no such folder")
    if not index_file.is_file():
        if (folder / PROGRESS).is_file():
            raise DataError(f"{where}: an unfinished moe-data prepare output (no {INDEX}); rerun that command to finish it")
        raise DataError(f"{where}: a prepared folder without its {INDEX}; prepare it again with moe-data prepare")
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{where}: {INDEX} cannot be read ({getattr(e, 'msg', None) or e}); prepare the folder again") from e
    _check_index(index, where)
    itemsize, vocab = np.dtype(index["dtype"]).itemsize, index["tokenizer"]["vocab_size"]
    for split in SPLITS:
        for shard in index["splits"][split]["shards"]:
            try:
                size = (folder / shard["file"]).stat().st_size
            except OSError:
                raise DataError(f"{where}: shard {shard['file']} is missing; prepare the folder again") from None
            problem = size_problem(shard["file"], size, shard, itemsize)
            if problem:
                raise DataError(f"{where}: {problem}")
            if shard["max_id"] >= vocab:
                raise DataError(f"{where}: shard {shard['file']} holds token id {shard['max_id']} (index.json), "
                                f"outside the tokenizer's vocabulary of {vocab} ids; prepare the folder again")
    return Prepared(folder, index, where)


def _check_index(index, where: str) -> None:
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{where}: {INDEX} is not a moe-data prepare index")
    if index.get("version") != VERSION:
        raise DataError(f"{where}: {INDEX} has format version {index.get('version')}; this Switchyard reads "
                        f"version {VERSION}: prepare the folder again")
    try:
        assert index["dtype"] in ("uint16", "uint32")
        for split in SPLITS:
            for shard in index["splits"][split]["shards"]:
                assert isinstance(shard["file"], str) and "/" not in shard["file"]
                assert int(shard["tokens"]) > 0 and int(shard["bytes"]) >= 0 and isinstance(shard["sha256"], str)
                assert isinstance(shard["max_id"], int) and isinstance(shard["counts"], str)
        assert isinstance(index["tokenizer"]["vocab_size"], int)
        for key in ("identity", "kind"):
            assert isinstance(index["tokenizer"][key], str)
        assert isinstance(index["settings"], dict) and isinstance(index["fingerprint"], str)
    except (AssertionError, KeyError, TypeError, ValueError):
        raise DataError(f"{where}: {INDEX} is incomplete or damaged; prepare the folder again") from None


# ---------------------------------------------------------------- for a run and for moe-eval
@dataclasses.dataclass
class RunData:
    cfg: DataConfig  # the settings in force (a prepared folder's, for one)
    tokenizer: Tokenizer
    train: Corpus
    validation: Corpus
    fingerprint: str  # the data's part of what a checkpoint must match


def open_run_data(cfg: DataConfig, workdir: pathlib.Path, *, write: bool = True,
                  log: Callable[[str], None] = print) -> RunData:
    """The tokenizer, both splits' token streams and the data fingerprint of a training run.

    Raw text: read and tokenized here, as always (a BPE trained unless ``workdir`` has one). A
    prepared folder: memory-mapped, its tokenizer copied into ``workdir`` (when ``write``).
    """
    if not is_prepared(cfg.path):
        tokenizer = build_tokenizer(cfg, workdir, lambda: corpus_texts(cfg, "train"))
        train, validation = (load_corpus(cfg, tokenizer, split) for split in SPLITS)
        return RunData(cfg, tokenizer, train, validation, data_fingerprint(cfg))
    prepared = open_prepared(cfg.path)
    prepared.check_sample()
    resolved = prepared.resolve(cfg, log)
    tokenizer = prepared.tokenizer()
    if write:
        prepared.copy_tokenizer(workdir)
    return RunData(resolved, tokenizer, prepared.corpus("train"), prepared.corpus("validation"), prepared.fingerprint)


def open_eval_data(cfg: DataConfig, workdir: pathlib.Path, data_path: str | None = None) -> tuple[Tokenizer, Corpus]:
    """The run's tokenizer and what moe-eval scores: the validation split of the run's data, or
    every token of ``data_path`` (a prepared folder's train then validation split)."""
    tokenizer = build_tokenizer(cfg, workdir, lambda: iter(()))
    path = cfg.path if data_path is None else data_path
    split = "validation" if data_path is None else "all"
    if not is_prepared(path):
        data_cfg = cfg if data_path is None else dataclasses.replace(cfg, path=data_path, max_bytes=0)
        return tokenizer, load_corpus(data_cfg, tokenizer, split)
    prepared = open_prepared(path, describe_path(path) if data_path is None else f"--data_path={data_path}")
    prepared.check_sample()
    prepared.check_tokenizer(tokenizer)
    return tokenizer, prepared.corpus(split)
