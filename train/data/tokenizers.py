"""Tokenizers: text <-> int32 token ids.

Shape letters: N tokens of one text.

Two kinds share one small interface (``Tokenizer``):
  * ``byte`` (default)  ids 0..255 are the UTF-8 bytes of the text; pad=256, bos=257, eos=258.
                        No file, no training, every string round-trips.
  * ``bpe``             a subword tokenizer from a file: a Hugging Face ``tokenizer.json`` (a
                        byte-level BPE trained deterministically on the training split, or any
                        pretrained one), or a SentencePiece ``.model`` (needs the optional
                        ``sentencepiece`` package); ``load_tokenizer_file`` picks by the suffix.

``encode`` never adds special tokens (the data pipeline appends ``eos_id`` after each document);
``decode`` skips special and out-of-range ids and replaces invalid UTF-8, so it never raises on
whatever a model samples.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from train.errors import DataError

if TYPE_CHECKING:  # not imported at run time: worker processes import this module, and only this
    from train.data.config import DataConfig

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

    def __init__(self, tokenizer, specials: Sequence[str] = SPECIAL_TOKENS) -> None:  # tokenizers.Tokenizer
        """``specials``: the (pad, bos, eos) tokens; those the vocabulary lacks are appended at its end
        (a tokenizer.json from elsewhere; an imported model names its own, ``data.special_tokens``)."""
        missing = [t for t in dict.fromkeys(specials) if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens(missing)
        self._tok = tokenizer
        self.pad_id, self.bos_id, self.eos_id = (int(tokenizer.token_to_id(t)) for t in specials)
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
    def load(cls, path: str | os.PathLike, flag: str = "data.tokenizer_path",
             specials: Sequence[str] = SPECIAL_TOKENS) -> BPETokenizer:
        """Load a ``tokenizer.json``; a missing or unreadable file raises ``DataError`` naming ``flag``."""
        from tokenizers import Tokenizer as HFTokenizer

        path = pathlib.Path(path)
        if not path.is_file():
            raise DataError(f"{flag}={path}: no such file")
        _check_json(path, flag)
        try:
            tokenizer = HFTokenizer.from_file(str(path))
        except Exception as e:  # valid JSON, but not the tokenizer.json schema (a missing field, an unknown model)
            raise DataError(f"{flag}={path}: JSON, but not the Hugging Face tokenizer.json schema "
                            f"({_first_line(e)})") from e
        return cls(tokenizer, specials)

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        """The tokenizer ``to_json`` wrote (e.g. sent to a worker process)."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(text))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``.model``), through the optional ``sentencepiece`` package.

    Its own bos/eos ids are used; a model without an eos id is refused (documents need one),
    a missing pad or bos id falls back to eos.
    """

    name = "sentencepiece"

    def __init__(self, model_proto: bytes, where: str = "data.tokenizer_path") -> None:
        try:
            import sentencepiece
        except ImportError:
            raise DataError(f"{where}: a SentencePiece model needs the sentencepiece package "
                            "(pip install sentencepiece), or give a tokenizer.json") from None
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except Exception as e:  # not a serialized ModelProto
            raise DataError(f"{where}: not a valid SentencePiece model ({_first_line(e)})") from e
        self.model_proto = bytes(model_proto)
        self.vocab_size = int(self._sp.get_piece_size())
        self.eos_id = int(self._sp.eos_id())
        if self.eos_id < 0:
            raise DataError(f"{where}: the SentencePiece model has no end-of-sequence id (train it with eos_id >= 0)")
        self.bos_id = int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else self.eos_id
        self.pad_id = int(self._sp.pad_id()) if self._sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int32) for ids in self._sp.encode(list(texts), out_type=int)]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        valid = [i for i in _as_int_list(ids) if 0 <= i < self.vocab_size]
        return self._sp.decode(valid)

    @classmethod
    def load(cls, path: str | os.PathLike, flag: str = "data.tokenizer_path") -> SentencePieceTokenizer:
        path = pathlib.Path(path)
        try:
            proto = path.read_bytes()
        except OSError as e:
            raise DataError(f"{flag}={path}: cannot read ({e.strerror or e})") from e
        return cls(proto, where=f"{flag}={path}")


def _check_json(path: pathlib.Path, flag: str) -> None:
    """``DataError`` unless ``path`` holds a JSON object (the tokenizer.json schema is checked by its loader)."""
    import json

    try:
        value = json.loads(path.read_bytes())
    except OSError as e:
        raise DataError(f"{flag}={path}: cannot read ({e.strerror or e})") from e
    except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
        where = f" at line {e.lineno} column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise DataError(f"{flag}={path}: not a valid tokenizer.json (not JSON: {getattr(e, 'msg', e)}{where})") from None
    if not isinstance(value, dict):
        raise DataError(f"{flag}={path}: JSON, but not the Hugging Face tokenizer.json schema "
                        f"(a {type(value).__name__}, not an object)")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_tokenizer_file(path: str | os.PathLike, flag: str = "data.tokenizer_path",
                        specials: Sequence[str] = SPECIAL_TOKENS) -> Tokenizer:
    """A pretrained tokenizer from a local file: SentencePiece for ``*.model``, else a ``tokenizer.json``
    (with ``specials`` as its pad, bos and eos tokens)."""
    if pathlib.Path(path).suffix.lower() == ".model":
        return SentencePieceTokenizer.load(path, flag)
    return BPETokenizer.load(path, flag, specials)


def special_tokens(cfg: DataConfig) -> tuple[str, ...]:
    """The (pad, bos, eos) tokens of a BPE run: ``data.special_tokens``, else Switchyard's own."""
    return tuple(cfg.special_tokens.split(",")) if cfg.special_tokens else SPECIAL_TOKENS


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
    ``workdir/tokenizer.json`` (or ``workdir/tokenizer.model``, a SentencePiece model a prepared
    folder brought) if it exists (a rerun reuses it); else train on ``train_texts()`` with
    ``cfg.bpe_vocab_size`` and save it to ``workdir/tokenizer.json`` (when ``workdir`` is given).
    """
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    if cfg.tokenizer != "bpe":
        raise ValueError(f"data.tokenizer={cfg.tokenizer!r}: choose byte or bpe")
    if cfg.tokenizer_path:
        return load_tokenizer_file(cfg.tokenizer_path, specials=special_tokens(cfg))
    saved = pathlib.Path(workdir) / "tokenizer.json" if workdir is not None else None
    if saved is not None and saved.exists():
        return BPETokenizer.load(saved, specials=special_tokens(cfg))
    if saved is not None and saved.with_suffix(".model").exists():
        return SentencePieceTokenizer.load(saved.with_suffix(".model"))
    tokenizer = train_bpe(train_texts(), cfg.bpe_vocab_size)
    if saved is not None:
        tokenizer.save(saved)
    return tokenizer
