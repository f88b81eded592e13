"""The data section of a run's config and the fingerprint that names derived data.

It lives with the data package so that ``train/data`` imports nothing from the training core; the
core's ``Config`` holds a ``DataConfig`` and ``validate`` calls its ``check``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

from moe.fields import FieldError, StrictFields

TOKENIZERS = ("byte", "bpe")


def fingerprint(obj) -> str:
    """A short stable name for a JSON-able value (data and tokenizer caches are keyed by it)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


@dataclasses.dataclass
class DataConfig(StrictFields):
    path: str = ""  # "" = the running Python's standard library sources; else a file, folder or glob
    tokenizer: str = "byte"  # byte | bpe
    tokenizer_path: str = ""  # bpe: load this tokenizer.json instead of training one
    bpe_vocab_size: int = 2048
    validation_fraction: float = 0.05  # share of files held out for validation
    max_bytes: int = 0  # read at most this many bytes of text (0 = all)
    # bpe: the pad, bos and eos tokens as "PAD,BOS,EOS" (an imported model's own, e.g. "</s>,<s>,</s>");
    # "" = <pad>,<bos>,<eos>, appended to a tokenizer.json that lacks them
    special_tokens: str = ""

    def check(self) -> DataConfig:
        """Raise ``FieldError`` naming the first field out of its range (the path itself is checked
        when the data is opened: it may be a glob, a folder or a prepared folder)."""

        def need(cond, name, why):
            if not cond:
                raise FieldError("DataConfig", name, getattr(self, name), why)

        need(self.tokenizer in TOKENIZERS, "tokenizer", f"choose {' or '.join(TOKENIZERS)}")
        need(self.bpe_vocab_size >= 300, "bpe_vocab_size", "must be >= 300")
        need(0 < self.validation_fraction < 1, "validation_fraction", "must be in (0, 1)")
        need(self.max_bytes >= 0, "max_bytes", "must be >= 0 (0 = all)")
        tokens = self.special_tokens.split(",")
        need(not self.special_tokens or (len(tokens) == 3 and all(tokens)),
             "special_tokens", "three comma-separated tokens PAD,BOS,EOS (or empty)")
        if self.tokenizer_path:
            need(pathlib.Path(self.tokenizer_path).is_file(), "tokenizer_path", "no such file")
        return self
