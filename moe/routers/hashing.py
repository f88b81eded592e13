"""Hash routers (Hash Layers, Roller et al. 2021): no parameters, gate 1/k.

Shape letters: see ``moe/__init__.py``; V vocabulary (token ids a table covers).

  * ``hash``           a fixed pseudo-random table from token id to k distinct experts, seeded by
                       ``seed`` (``hash_scores``: any vocabulary size, no table in memory).
  * ``balanced_hash``  Hash Layers' balanced assignment: a table ``table`` [V, K] (model state)
                       that ``fit`` fills from the training split's token counts, so that every
                       expert carries about the same token mass; ids never seen keep their ``hash``
                       experts.
  * ``bigram_hash``    the hash of (previous token id, token id): the token's bigram chooses; the
                       first token of a sequence pairs with ``NO_PREVIOUS_TOKEN``. Cached decoding
                       passes the previous ids from the cache and routes as the full sequence does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moe.fields import FieldError, StrictFields, formerly
from moe.params import RouterState
from moe.routers import register
from moe.routers.base import (NO_PREVIOUS_TOKEN, RouteInput, Router, Routing, equal_gates, expert_load, fixed_route,
                              route_spec)

@dataclasses.dataclass
class HashOptions(StrictFields):
    seed: int = formerly(0, "hash_seed")  # seeds the token -> expert table

    def check(self) -> HashOptions:
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            self._fail("seed", "must be an integer")
        return self


@register
class Hash(Router):
    name = "hash"
    Options = HashOptions

    def __call__(self, inp: RouteInput) -> Routing:
        ids_BS = self.token_ids(inp)
        return hash_route(ids_BS, self.cfg.num_experts, self.cfg.experts_per_token, self.options.seed)

    def token_ids(self, inp: RouteInput) -> jax.Array:
        if inp.token_ids_BS is None:
            raise ValueError(f"MoEConfig.router={self.name!r}: the layer needs token_ids")
        return inp.token_ids_BS


@register
class BalancedHash(Hash):
    name = "balanced_hash"
    wants_token_counts = True

    def __init__(self, cfg, d_model, *, key, rngs, eval_seed=0, vocab_size=0):
        super().__init__(cfg, d_model, key=key, rngs=rngs, eval_seed=eval_seed, vocab_size=vocab_size)
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise FieldError("MoEConfig", "router", cfg.router, "the balanced_hash router needs the vocabulary size (>= 1)")
        table = hash_table(vocab_size, cfg.num_experts, cfg.experts_per_token, self.options.seed)
        self.table = RouterState(jnp.asarray(table), logical_axes=(None, None))  # fit() balances it

    def __call__(self, inp: RouteInput) -> Routing:
        return table_route(self.table[...], self.token_ids(inp), self.cfg.num_experts, out_sharding=route_spec())

    def fit(self, token_counts_V) -> None:
        counts_V = counts_for(token_counts_V, self.table.shape[0])
        table = balanced_table(counts_V, self.cfg.num_experts, self.cfg.experts_per_token, self.options.seed)
        self.table[...] = jax.device_put(table.astype(self.table.dtype), self.table[...].sharding)


@register
class BigramHash(Hash):
    name = "bigram_hash"

    def __call__(self, inp: RouteInput) -> Routing:
        ids_BS = self.token_ids(inp)
        prev_BS = previous_tokens(ids_BS) if inp.prev_token_ids_BS is None else inp.prev_token_ids_BS
        return bigram_hash_route(prev_BS, ids_BS, self.cfg.num_experts, self.cfg.experts_per_token, self.options.seed)


def _mix32(x):
    """MurmurHash3's 32-bit finaliser: a bijective avalanche mix of uint32 values (JAX or NumPy
    arrays: the same bits)."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash_scores(token_ids_BS, num_experts: int, seed: int, xp=jnp):
    """[B,S,E] pseudo-random scores that depend only on (token id, expert, seed).

    Their ranking per token is a fixed random permutation of the experts: the top k are the
    token's experts. It plays the part of Hash Layers' random lookup table, for any vocabulary.
    ``xp=np`` computes the same scores with NumPy on the host.
    """
    seed_111 = xp.full((1, 1, 1), seed & 0xFFFFFFFF, xp.uint32)  # an array: NumPy wraps arrays silently
    ids_BS1 = token_ids_BS.astype(xp.uint32)[..., None]
    experts_E = xp.arange(num_experts, dtype=xp.uint32)
    seed_mix = _mix32(seed_111 ^ np.uint32(0x9E3779B9))
    h_BSE = _mix32(_mix32(ids_BS1 ^ seed_mix) + (experts_E * np.uint32(0x632BE5AB))[None, None, :])
    return (h_BSE >> 8).astype(xp.float32)  # 24 bits: exact in float32, exact comparisons


def hash_route(token_ids_BS: jax.Array, num_experts: int, k: int, seed: int) -> Routing:
    """Hash Layers routing: equal token ids always go to equal experts."""
    return fixed_route(hash_scores(token_ids_BS, num_experts, seed), k)


def hash_table(vocab_size: int, num_experts: int, k: int, seed: int) -> np.ndarray:
    """int32 [V, K]: the ``hash`` router's experts for every token id (as a lookup table), computed
    with NumPy: concrete while a model is built under jit, and no device program per operation. The
    order is ``jax.lax.top_k``'s: highest score first, equal scores by lower expert index."""
    scores_VE = hash_scores(np.arange(vocab_size)[None], num_experts, seed, xp=np)[0]
    return np.argsort(-scores_VE, axis=1, kind="stable")[:, :k].astype(np.int32)


def counts_for(token_counts, vocab_size: int) -> np.ndarray:
    """float64 [V]: the training split's token counts cut or zero-padded to the table's vocabulary."""
    counts_V = np.zeros(vocab_size)
    counts = np.asarray(token_counts)[:vocab_size]
    counts_V[: len(counts)] = counts
    return counts_V


def balanced_table(counts_V: np.ndarray, num_experts: int, k: int, seed: int) -> np.ndarray:
    """int32 [V, K] token -> experts balancing the training mass (Hash Layers, "balanced").

    Token ids in decreasing frequency each take the k experts that carry the least mass so far
    (ties to the lower index) and add count/k to each; ids never seen keep their ``hash`` experts.
    """
    counts_V = np.asarray(counts_V, np.float64)
    table = hash_table(len(counts_V), num_experts, k, seed)
    mass_E = np.zeros(num_experts)
    for token in np.argsort(-counts_V, kind="stable"):
        if counts_V[token] <= 0:
            break
        chosen = np.argsort(mass_E, kind="stable")[:k]
        table[token] = chosen
        mass_E[chosen] += counts_V[token] / k
    return table


def table_route(table_VK: jax.Array, token_ids_BS: jax.Array, num_experts: int, out_sharding=None) -> Routing:
    """Routing by table lookup (``balanced_hash``); gates 1/k; ids past the table are clipped.
    ``out_sharding``: the [B,S,K] ids' spec under an explicit mesh (the batch's)."""
    ids_BSK = table_VK.at[token_ids_BS].get(mode="clip", out_sharding=out_sharding).astype(jnp.int32)
    return equal_gates(ids_BSK, expert_load(ids_BSK, num_experts))


def previous_tokens(token_ids_BS: jax.Array) -> jax.Array:
    """[B,S] the token before each one in its row; ``NO_PREVIOUS_TOKEN`` at position 0."""
    first_B1 = jnp.full_like(token_ids_BS[:, :1], NO_PREVIOUS_TOKEN)
    return jnp.concatenate([first_B1, token_ids_BS[:, :-1]], axis=1)


def bigram_ids(prev_ids_BS: jax.Array, token_ids_BS: jax.Array) -> jax.Array:
    """uint32 [B,S] id of each (previous token, token) pair: a bijective mix of the previous id,
    xor-ed with the current one (distinct pairs collide only as 32-bit hashes do)."""
    prev = _mix32(prev_ids_BS.astype(jnp.uint32) ^ np.uint32(0xB5297A4D))
    return prev ^ token_ids_BS.astype(jnp.uint32)


def bigram_hash_route(prev_ids_BS, token_ids_BS, num_experts: int, k: int, seed: int) -> Routing:
    """Hash routing on the bigram: equal (previous, current) pairs always go to equal experts."""
    return fixed_route(hash_scores(bigram_ids(prev_ids_BS, token_ids_BS), num_experts, seed), k)
