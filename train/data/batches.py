"""Token stream -> batches: deterministic, checkpointable training batches and exact eval batches.

Shape letters: N tokens in a stream, R records, G global batch, B local batch (G / processes),
S sequence length (``train.seq_len``).

Training records are non-overlapping windows of S+1 tokens with stride S (the last token of one
record is the first of the next). Epoch e is a permutation of all R records drawn from the seed
and e (Grain's epoch-aware index shuffle). Global batch b is records [b*G, (b+1)*G) of that
endless shuffled sequence; process p reads only rows [p*B, (p+1)*B) of it. The iterator state is
the next batch index (plus what must match on resume), so resuming is exact and cheap.

The tokens may be an in-memory array (made int32 once, as always) or a lazily indexed source: a
``np.memmap`` or a ``TokenSource`` such as a prepared folder's shards. Those are never copied
whole: each window is read (and made int32) when its row is asked for, so a process touches only
the records of its own rows.
"""

from __future__ import annotations

import collections.abc
import hashlib
import operator

import grain
import numpy as np

from train.data.sources import describe_path
from train.errors import DataError


class TokenSource:
    """A 1-D token stream read lazily: ``len(src)`` tokens, ``src[a:b]`` an integer array [b-a].

    Subclasses (``train.data.prepared.ShardedTokens``) read only the slices asked for;
    ``np.asarray(src)`` reads everything.
    """

    ndim = 1

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: slice) -> np.ndarray:
        raise NotImplementedError

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        whole_N = self[0 : len(self)]
        return whole_N if dtype is None else whole_N.astype(dtype, copy=False)


def as_tokens(tokens) -> np.ndarray | TokenSource:
    """In-memory tokens as one int32 array [N] (as always); a memory map or ``TokenSource`` as is."""
    if isinstance(tokens, (np.memmap, TokenSource)):
        if tokens.ndim != 1:
            raise ValueError(f"tokens: expected a 1-D memory map, got shape {tokens.shape}")
        return tokens
    tokens_N = np.asarray(tokens, dtype=np.int32)
    if tokens_N.ndim != 1:
        raise ValueError(f"tokens: expected a 1-D array, got shape {tokens_N.shape}")
    return tokens_N


def token_counts(tokens: np.ndarray | TokenSource, vocab_size: int, block: int = 1 << 24) -> np.ndarray:
    """int64 [V] occurrences of each id; a memory map or ``TokenSource`` is read ``block`` tokens at a
    time (flat memory: no int copy of the whole stream, as ``np.bincount(tokens)`` would make)."""
    counts_V = np.zeros((vocab_size,), dtype=np.int64)
    for start in range(0, len(tokens), block):
        part_N = np.asarray(tokens[start : start + block])
        counts_V += np.bincount(part_N, minlength=vocab_size)[:vocab_size]
    return counts_V


def split_counts(corpus, vocab_size: int) -> np.ndarray:
    """``token_counts`` of ``corpus.tokens``, from the histograms a prepared folder's index holds when it
    has them (nothing read), else counted."""
    if corpus.counts is None:
        return token_counts(corpus.tokens, vocab_size)
    counts_V = np.zeros((vocab_size,), dtype=np.int64)
    n = min(vocab_size, len(corpus.counts))
    counts_V[:n] = corpus.counts[:n]
    return counts_V


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
        tokens: np.ndarray | TokenSource,
        seq_len: int,
        global_batch: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
        *,
        data_path: str | None = None,
    ) -> None:
        self.local_batch = _check_batching(global_batch, seq_len, process_index, process_count)
        self._tokens_N = as_tokens(tokens)  # never copied whole unless it is an in-memory array
        self.seq_len = seq_len
        self.global_batch = global_batch
        self.process_index = process_index
        self.process_count = process_count
        num_tokens = len(self._tokens_N)
        self.num_records = (num_tokens - 1) // seq_len
        if self.num_records < 1:
            raise DataError(
                f"{describe_path(data_path)}: {num_tokens} tokens, fewer than train.seq_len+1={seq_len + 1}"
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
        return np.asarray(self._tokens_N[start : start + self.seq_len + 1], dtype=np.int32)  # [S+1], read now

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
    tokens: np.ndarray | TokenSource,
    seq_len: int,
    global_batch: int,
    max_batches: int,
    process_index: int = 0,
    process_count: int = 1,
    *,
    data_path: str | None = None,
) -> EvalBatches:
    """Validation batches: consecutive windows from the start, no shuffle.

    Row r of the stream predicts tokens [r*S+1, r*S+S] (inputs are the S tokens before). With
    ``max_batches`` = 0 the whole stream is covered: the last window may be partial and the last
    global batch is filled with pad rows, their ``weights`` 0, so each predicted token is scored
    exactly once. Each dict: inputs, targets int32 [B,S]; weights float32 [B,S]. A sequence whose
    batches are built when asked for (a memory map or ``TokenSource`` is read one row at a time), so
    scoring a large split holds one batch at a time.
    """
    local = _check_batching(global_batch, seq_len, process_index, process_count)
    if isinstance(tokens, (np.memmap, TokenSource)):
        tokens_N = as_tokens(tokens)
    else:
        tokens_N = np.asarray(tokens, dtype=np.int32).reshape(-1)
    num_targets = len(tokens_N) - 1
    if num_targets < 1:
        raise DataError(f"{describe_path(data_path)}: the validation split has {len(tokens_N)} tokens, need at least 2")
    num_rows = -(-num_targets // seq_len)
    num_batches = -(-num_rows // global_batch)
    if max_batches > 0:
        num_batches = min(num_batches, max_batches)
    return EvalBatches(tokens_N, seq_len, global_batch, local, process_index, num_batches)


class EvalBatches(collections.abc.Sequence):
    """``eval_batches``'s batches, each built from the tokens when indexed (or iterated over)."""

    def __init__(self, tokens_N, seq_len: int, global_batch: int, local: int, process_index: int, num_batches: int):
        self._tokens_N, self._seq_len, self._global, self._local = tokens_N, seq_len, global_batch, local
        self._process_index, self._num_batches = process_index, num_batches

    def __len__(self) -> int:
        return self._num_batches

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        b = operator.index(index) + (len(self) if index < 0 else 0)
        if not 0 <= b < len(self):
            raise IndexError(f"batch {index}: out of range for {len(self)} batches")
        s, local, num_targets = self._seq_len, self._local, len(self._tokens_N) - 1
        inputs_BS = np.zeros((local, s), dtype=np.int32)
        targets_BS = np.zeros((local, s), dtype=np.int32)
        weights_BS = np.zeros((local, s), dtype=np.float32)
        for j in range(local):
            start = (b * self._global + self._process_index * local + j) * s
            n = min(s, num_targets - start)
            if n <= 0:
                continue  # a pad row
            row_N = np.asarray(self._tokens_N[start : start + n + 1], dtype=np.int32)  # [n+1], one read
            inputs_BS[j, :n] = row_N[:n]
            targets_BS[j, :n] = row_N[1 : n + 1]
            weights_BS[j, :n] = 1.0
        return {"inputs": inputs_BS, "targets": targets_BS, "weights": weights_BS}
