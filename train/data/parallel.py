"""Tokenizing a stream of documents in worker processes, in order, with bounded memory.

Shape letters: N tokens.

``chunks`` groups documents into consecutive chunks of about ``chunk_chars`` characters (the
grouping depends only on the documents, so a chunk index is a stable position in the stream);
``encoded`` tokenizes them in ``workers`` processes, at most two chunks per worker in flight, and
yields the results in order: each document's ids followed by eos, as ``load_corpus`` builds its
stream. The workers are spawned, not forked (a process that has started JAX's threads must not
fork); they import only this module, the tokenizers and NumPy.
"""

from __future__ import annotations

import collections
import multiprocessing
import os
from collections.abc import Iterable, Iterator

import numpy as np

from train.data.tokenizers import BPETokenizer, ByteTokenizer, SentencePieceTokenizer, Tokenizer

CHUNK_CHARS = 1 << 20  # characters of text per tokenization task


def tokenizer_spec(tokenizer: Tokenizer, dtype: str) -> tuple:
    """What a worker needs to rebuild the tokenizer (picklable)."""
    if isinstance(tokenizer, BPETokenizer):
        payload = ("hf", tokenizer.to_json())
    elif isinstance(tokenizer, SentencePieceTokenizer):
        payload = ("spm", tokenizer.model_proto)
    else:
        payload = ("byte", None)
    return (*payload, tokenizer.eos_id, dtype)


def _from_spec(spec: tuple) -> Tokenizer:
    kind, payload = spec[0], spec[1]
    if kind == "hf":
        return BPETokenizer.from_json(payload)
    return SentencePieceTokenizer(payload) if kind == "spm" else ByteTokenizer()


def _encode(tokenizer: Tokenizer, docs: list[str], eos: int, dtype: str) -> tuple[np.ndarray, int, int, int]:
    """(tokens [N]: each document's ids then eos, text bytes, documents, U+FFFD characters) of one chunk."""
    eos_1 = np.array([eos], dtype=np.int64)
    pieces = [piece for ids in tokenizer.encode_batch(docs) for piece in (ids, eos_1)]
    tokens_N = np.concatenate(pieces).astype(np.dtype(dtype).newbyteorder("<"))
    replaced = sum(doc.count("\ufffd") for doc in docs)
    return tokens_N, sum(len(doc.encode("utf-8")) for doc in docs), len(docs), replaced


_WORKER: dict = {}


def _init_worker(spec: tuple) -> None:
    _WORKER["tokenizer"], _WORKER["eos"], _WORKER["dtype"] = _from_spec(spec), spec[2], spec[3]


def _encode_in_worker(docs: list[str]) -> tuple[np.ndarray, int, int, int]:
    return _encode(_WORKER["tokenizer"], docs, _WORKER["eos"], _WORKER["dtype"])


def chunks(docs: Iterable[str], chunk_chars: int) -> Iterator[list[str]]:
    """Consecutive groups of documents of about ``chunk_chars`` characters (deterministic)."""
    chunk, size = [], 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc)
        if size >= chunk_chars:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def encoded(groups: Iterable[list[str]], spec: tuple, workers: int, first: int) -> Iterator[tuple[int, tuple]]:
    """(chunk index, (tokens [N], text bytes, documents, U+FFFD characters)) in order from chunk ``first`` on; the
    chunks before it are only read (a resumed preparation has their tokens already)."""
    if workers <= 1:
        tokenizer = _from_spec(spec)
        for c, docs in enumerate(groups):
            if c >= first:
                yield c, _encode(tokenizer, docs, spec[2], spec[3])
        return
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the workers are the parallelism
    try:
        pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker, initargs=(spec,))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved
    with pool:
        pending: collections.deque = collections.deque()
        for c, docs in enumerate(groups):
            if c < first:
                continue
            pending.append((c, pool.apply_async(_encode_in_worker, (docs,))))
            if len(pending) >= 2 * workers:
                c0, result = pending.popleft()
                yield c0, result.get()
        while pending:
            c0, result = pending.popleft()
            yield c0, result.get()
