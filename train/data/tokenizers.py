"""Tokenizers: text <-> int32 token ids.

Shape letters: N tokens of one text.

Two kinds share one small interface (``Tokenizer``):
  * ``byte`` (default)  ids 0..255 are the UTF-8 bytes of the text; pad=256, bos=257, eos=258.
                        No file, no training, every string round-trips.
  * ``bpe``             a Hugging Face ``tokenizers`` byte-level BPE, loaded from a
                        ``tokenizer.json`` or trained deterministically on the training split.

``encode`` never adds special tokens (the data pipeline appends ``eos_id`` after each document);
``decode`` skips special and out-of-range ids and replaces invalid UTF-8, so it never raises on
whatever a model samples.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from train.core.config import DataConfig
from train.errors import DataError

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # BPE ids 0, 1, 2 when trained here


class Tokenizer:
    """The interface every tokenizer provides."""

    name: str
    vocab_size: int  # including the special tokens
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray:
        """int32 [N] ids of ``text``; no special tokens added."""
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """``encode`` for many texts (subclasses may do it in parallel)."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of ``ids``; special tokens skipped, invalid UTF-8 replaced, never raises."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def _as_int_list(ids: Iterable[int] | np.ndarray) -> list[int]:
    return [int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)]


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255, then pad=256, bos=257, eos=258."""

    name = "byte"
    vocab_size = 259
    pad_id = 256
    bos_id = 257
    eos_id = 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids_N = np.asarray(ids, dtype=np.int64).reshape(-1)
        ids_N = ids_N[(ids_N >= 0) & (ids_N < 256)]
        return ids_N.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class BPETokenizer(Tokenizer):
    """A byte-level BPE from the Hugging Face ``tokenizers`` library."""

    name = "bpe"

    def __init__(self, tokenizer) -> None:  # tokenizers.Tokenizer
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:  # a tokenizer.json from elsewhere: append our special tokens at the end
            tokenizer.add_special_tokens(missing)
        self._tok = tokenizer
        self.pad_id, self.bos_id, self.eos_id = (int(tokenizer.token_to_id(t)) for t in SPECIAL_TOKENS)
        self.vocab_size = int(tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int32) for e in encodings]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        valid = [i for i in _as_int_list(ids) if 0 <= i < self.vocab_size]
        try:
            return self._tok.decode(valid, skip_special_tokens=True)
        except Exception:  # a broken decoder in a foreign tokenizer.json: fall back to tokens
            return "".join(self._tok.id_to_token(i) or "" for i in valid)

    def to_json(self) -> str:
        return self._tok.to_str()

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` atomically (a temporary file, then ``os.replace``)."""
        path = pathlib.Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BPETokenizer:
        """Load a ``tokenizer.json``; a missing or unreadable file raises ``DataError``."""
        from tokenizers import Tokenizer as HFTokenizer

        path = pathlib.Path(path)
        if not path.is_file():
            raise DataError(f"data.tokenizer_path={path}: no such file")
        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as e:  # corrupt JSON, unknown model type, unreadable file
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"data.tokenizer_path={path}: not a valid tokenizer.json ({why})") from e
        return cls(tokenizer)


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
    """Train a byte-level BPE with ``vocab_size`` ids (special tokens included).

    Deterministic: the same texts in the same order give the same tokenizer.json.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(SPECIAL_TOKENS):
        raise ValueError(f"data.bpe_vocab_size={vocab_size}: must be >= {len(alphabet) + len(SPECIAL_TOKENS)}")
    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return BPETokenizer(tokenizer)


def build_tokenizer(
    cfg: DataConfig,
    workdir: pathlib.Path | None,
    train_texts: Callable[[], Iterable[str]],
) -> Tokenizer:
    """The tokenizer a run uses.

    ``byte``: ``ByteTokenizer``. ``bpe``: ``cfg.tokenizer_path`` if set; else
    ``workdir/tokenizer.json`` if it exists (a rerun reuses it); else train on ``train_texts()``
    with ``cfg.bpe_vocab_size`` and save it to ``workdir/tokenizer.json`` (when ``workdir`` is given).
    """
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer != "bpe":
        raise ValueError(f"data.tokenizer={cfg.tokenizer!r}: choose byte or bpe")
    if cfg.tokenizer_path:
        return BPETokenizer.load(cfg.tokenizer_path)
    saved = pathlib.Path(workdir) / "tokenizer.json" if workdir is not None else None
    if saved is not None and saved.exists():
        return BPETokenizer.load(saved)
    tokenizer = train_bpe(train_texts(), cfg.bpe_vocab_size)
    if saved is not None:
        tokenizer.save(saved)
    return tokenizer
