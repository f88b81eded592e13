"""Sampling text from a trained model with a KV cache: each new token costs one position.

Shape letters: B batch (1 here), S new positions, T cache length, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe.transformer import Transformer


def sample_logits(logits_V: jax.Array, key: jax.Array, temperature: float, top_k: int) -> jax.Array:
    """Greedy at temperature 0; else softmax(logits / T) restricted to the top k (0 = all)."""
    if temperature <= 0:
        return jnp.argmax(logits_V, axis=-1).astype(jnp.int32)
    logits_V = logits_V.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits_V, top_k)[0][..., -1:]
        logits_V = jnp.where(logits_V < kth, -jnp.inf, logits_V)
    return jax.random.categorical(key, logits_V, axis=-1).astype(jnp.int32)


def cache_bytes(model: Transformer, length: int) -> int:
    """Bytes of the KV cache ``generate`` allocates for ``length`` positions (nothing is allocated)."""
    cache = jax.eval_shape(lambda: model.init_cache(1, length))
    return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))


@nnx.jit(static_argnames=("temperature", "top_k"))
def _decode_and_sample(model, tokens_BS, positions_BS, cache, key, temperature, top_k):
    logits_BSV, cache = model.decode(tokens_BS, positions_BS, cache)
    return sample_logits(logits_BSV[:, -1], key, temperature, top_k), logits_BSV[:, -1], cache


def generate(
    model: Transformer,
    prompt_ids: list[int] | np.ndarray,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    stop_id: int | None = None,
) -> tuple[list[int], np.ndarray]:
    """New token ids after ``prompt_ids`` and their logits [n, V] (model in eval mode)."""
    if model.cfg.non_causal_routing:
        raise ValueError(f"{model.cfg.non_causal_message()}: it needs later tokens; cannot generate")
    prompt = np.asarray(prompt_ids, dtype=np.int32).reshape(1, -1)
    if prompt.shape[1] < 1:
        raise ValueError("prompt: must contain at least one token")
    total = prompt.shape[1] + max_new_tokens
    cache = model.init_cache(1, total)
    key = jax.random.key(seed)
    positions = jnp.arange(prompt.shape[1], dtype=jnp.int32)[None]
    token, logits, cache = _decode_and_sample(  # prefill: the whole prompt in one call
        model, jnp.asarray(prompt), positions, cache, jax.random.fold_in(key, 0), temperature, top_k
    )
    out, all_logits = [], []
    for i in range(max_new_tokens):
        out.append(int(token[0]))
        all_logits.append(np.asarray(logits[0]))
        if (stop_id is not None and out[-1] == stop_id) or i + 1 == max_new_tokens:
            break
        pos = jnp.full((1, 1), prompt.shape[1] + i, jnp.int32)
        token, logits, cache = _decode_and_sample(
            model, token[:, None], pos, cache, jax.random.fold_in(key, i + 1), temperature, top_k
        )
    return out, np.stack(all_logits)
