"""Routers: tokens -> (expert ids, gate weights, router losses, statistics).

Shape letters: B batch, S sequence, D model width, E experts, K experts per token.

Routing is per-token math on global arrays (outside any ``shard_map``), so decisions and
statistics are the same on 1 device or 64: every mean below runs over the global batch, and the
random router draws from a counter-based key (threefry, partitionable) indexed by the token's
global position, never by the device.

Every router shares one interface and returns a ``Routing``:
  * ``topk``  learned softmax router in float32; k=1 is Switch (gate = router probability),
              k>1 renormalises the chosen probabilities (Mixtral).
  * ``frozen`` the same with router weights fixed at initialisation (the layer keeps them as
              non-trainable state; the routing math is ``topk_route``).
  * ``hash``  Hash Layers: a fixed pseudo-random table token id -> expert(s), seeded by
              ``hash_seed``; no parameters; gate 1 (1/k each for k>1).
  * ``balanced_hash`` Hash Layers' balanced assignment: a table token id -> k experts, filled
              greedily from training-set token frequencies so that every expert carries about
              the same token mass (``balanced_table``); unseen ids keep their ``hash`` experts.
  * ``bigram_hash`` the same table indexed by a hash of (previous token id, token id): the
              token's bigram chooses (Hash Layers' bigram variant); the first token of a
              sequence has the previous id ``NO_PREVIOUS_TOKEN``.
  * ``gshard`` learned top-2 whose second expert is used only with probability proportional to
              its gate (``gshard_route``).
  * ``loss_free`` DeepSeek-V3's auxiliary-loss-free balancing: top-k of the router
              probabilities plus a per-expert bias (selection only; the gates are the plain
              probabilities), no load-balance loss (``loss_free_route``); the layer moves the
              bias by +-gamma toward equal load after every training step.
  * ``random`` a fresh uniformly random choice of k distinct experts per token on every call;
              gate 1 (1/k each for k>1).
  * ``thor``  THOR's stochastic experts: in training one random expert for every token of the
              batch (``thor_expert``, ``single_expert_route``; the layer then runs that expert
              on all tokens with no dispatch); in evaluation a random expert per token with a
              fixed seed (``random_route``). Gate 1.
  * ``expert_choice`` experts choose tokens: within each capacity group every expert takes the
              C tokens with the highest router probability for it (``expert_choice_route``);
              a token may get several experts or none. NON-CAUSAL: a token's experts depend
              on the scores of later tokens in its group.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Routing(NamedTuple):
    expert_ids: jax.Array  # [B,S,K] int32, k distinct experts per token, best first; E = none (gshard)
    gates: jax.Array  # [B,S,K] float32
    aux_loss: jax.Array  # scalar, Switch load-balance loss E * sum_i f_i P_i (unweighted; 1 when balanced)
    z_loss: jax.Array  # scalar, mean over tokens of logsumexp(logits)^2 (unweighted)
    expert_load: jax.Array  # [E] share of the B*S*K assignments sent to each expert (sums to 1)
    router_entropy: jax.Array  # scalar, mean entropy (nats) of the router distribution; 0 without one
    # expert_choice only: share of tokens that no expert took (they pass through the residual)
    unrouted_fraction: jax.Array | None = None
    # int32 scalar when every token goes to this one expert (THOR in training): the layer then
    # runs that expert on all tokens with no dispatch
    single_expert: jax.Array | None = None


def top_k(scores_BSE: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """``jax.lax.top_k`` over the expert axis: (values [B,S,K], int32 ids [B,S,K]), best first,
    ties to the lower index.

    For small k it is k rounds of argmax-and-mask: XLA:CPU lowers top_k to a full sort per
    token, which at 128 experts costs more than the rest of the layer's routing.
    """
    if k > 4:
        values, ids = jax.lax.top_k(scores_BSE, k)
        return values, ids.astype(jnp.int32)
    experts_E = jnp.arange(scores_BSE.shape[-1], dtype=jnp.int32)
    masked, ids = jax.lax.stop_gradient(scores_BSE), []
    for _ in range(k):
        best = jnp.argmax(masked, axis=-1).astype(jnp.int32)
        ids.append(best)
        masked = jnp.where(experts_E == best[..., None], -jnp.inf, masked)
    ids_BSK = jnp.stack(ids, axis=-1)
    return jnp.take_along_axis(scores_BSE, ids_BSK, axis=-1), ids_BSK


def expert_load(expert_ids_BSK: jax.Array, num_experts: int) -> jax.Array:
    """[E] fraction of all token-expert assignments that go to each expert (global)."""
    one_hot_BSKE = jax.nn.one_hot(expert_ids_BSK, num_experts, dtype=jnp.float32)
    return jnp.mean(jnp.sum(one_hot_BSKE, axis=2), axis=(0, 1)) / expert_ids_BSK.shape[-1]


def load_balance_loss(probs_BSE: jax.Array, load_E: jax.Array) -> jax.Array:
    """Switch Transformer auxiliary loss E * sum_i f_i * P_i.

    f_i (``load_E``) is the share of assignments routed to expert i and carries no gradient;
    P_i is the mean router probability of expert i. Equals 1 under perfect balance.
    """
    num_experts = probs_BSE.shape[-1]
    mean_prob_E = jnp.mean(probs_BSE, axis=(0, 1))
    return num_experts * jnp.sum(jax.lax.stop_gradient(load_E) * mean_prob_E)


def router_entropy(logits_BSE: jax.Array, probs_BSE: jax.Array) -> jax.Array:
    """Mean entropy (nats) of the router distribution over the batch."""
    return -jnp.mean(jnp.sum(probs_BSE * jax.nn.log_softmax(logits_BSE, axis=-1), axis=-1))


def router_z_loss(logits_BSE: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits_BSE, axis=-1)))


def topk_route(logits_BSE: jax.Array, k: int) -> Routing:
    """Learned top-k routing from float32 router logits."""
    logits_BSE = logits_BSE.astype(jnp.float32)
    num_experts = logits_BSE.shape[-1]
    probs_BSE = jax.nn.softmax(logits_BSE, axis=-1)
    gates_BSK, ids_BSK = top_k(probs_BSE, k)
    if k > 1:
        gates_BSK = gates_BSK / jnp.sum(gates_BSK, axis=-1, keepdims=True)
    load_E = expert_load(ids_BSK, num_experts)
    return Routing(
        expert_ids=ids_BSK.astype(jnp.int32),
        gates=gates_BSK,
        aux_loss=load_balance_loss(probs_BSE, load_E),
        z_loss=router_z_loss(logits_BSE),
        expert_load=load_E,
        router_entropy=router_entropy(logits_BSE, probs_BSE),
    )


def loss_free_route(logits_BSE: jax.Array, bias_E: jax.Array, k: int) -> Routing:
    """Top-k of (probabilities + bias), gated by the probabilities alone (renormalised for k > 1).
    The bias carries no gradient; ``aux_loss`` is 0 (balance comes from the bias)."""
    logits_BSE = logits_BSE.astype(jnp.float32)
    num_experts = logits_BSE.shape[-1]
    probs_BSE = jax.nn.softmax(logits_BSE, axis=-1)
    _, ids_BSK = top_k(jax.lax.stop_gradient(probs_BSE) + jax.lax.stop_gradient(bias_E), k)
    gates_BSK = jnp.take_along_axis(probs_BSE, ids_BSK, axis=-1)
    if k > 1:
        gates_BSK = gates_BSK / jnp.sum(gates_BSK, axis=-1, keepdims=True)
    return Routing(
        expert_ids=ids_BSK,
        gates=gates_BSK,
        aux_loss=jnp.zeros((), jnp.float32),
        z_loss=router_z_loss(logits_BSE),
        expert_load=expert_load(ids_BSK, num_experts),
        router_entropy=router_entropy(logits_BSE, probs_BSE),
    )


def loss_free_bias_update(bias_E: jax.Array, load_E: jax.Array, gamma: float) -> jax.Array:
    """bias_e + gamma * sign(mean load - load_e): underloaded experts up, overloaded down."""
    return bias_E + gamma * jnp.sign(jnp.mean(load_E) - load_E)


def _mix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijective avalanche mix of uint32 values."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash_scores(token_ids_BS: jax.Array, num_experts: int, seed: int) -> jax.Array:
    """[B,S,E] pseudo-random scores that depend only on (token id, expert, seed).

    Their ranking per token is a fixed random permutation of the experts: the top k are the
    token's experts. It plays the part of Hash Layers' random lookup table, for any vocabulary.
    """
    seed_mix = _mix32(jnp.uint32(seed & 0xFFFFFFFF) ^ jnp.uint32(0x9E3779B9))
    ids_BS1 = token_ids_BS.astype(jnp.uint32)[..., None]
    experts_E = jnp.arange(num_experts, dtype=jnp.uint32)
    h_BSE = _mix32(_mix32(ids_BS1 ^ seed_mix) + experts_E * jnp.uint32(0x632BE5AB))
    return (h_BSE >> 8).astype(jnp.float32)  # 24 bits: exact in float32, exact comparisons


def _equal_gates(ids_BSK: jax.Array, load_E: jax.Array, **extra) -> Routing:
    """Routing with no router distribution: gates 1/k, no router losses, entropy 0."""
    k = ids_BSK.shape[-1]
    zero = jnp.zeros((), jnp.float32)
    return Routing(ids_BSK, jnp.full(ids_BSK.shape, 1.0 / k, jnp.float32), zero, zero, load_E, zero, **extra)


def _fixed_route(scores_BSE: jax.Array, k: int) -> Routing:
    """The top-k scores choose; gates 1/k."""
    _, ids_BSK = top_k(scores_BSE, k)
    return _equal_gates(ids_BSK, expert_load(ids_BSK, scores_BSE.shape[-1]))


def hash_route(token_ids_BS: jax.Array, num_experts: int, k: int, seed: int) -> Routing:
    """Hash Layers routing: equal token ids always go to equal experts."""
    return _fixed_route(hash_scores(token_ids_BS, num_experts, seed), k)


def hash_table(vocab_size: int, num_experts: int, k: int, seed: int) -> np.ndarray:
    """int32 [V, K]: the ``hash`` router's experts for every token id (as a lookup table)."""
    with jax.ensure_compile_time_eval():  # concrete even while a model is built under jit
        _, ids = jax.lax.top_k(hash_scores(jnp.arange(vocab_size, dtype=jnp.int32)[None], num_experts, seed), k)
        return np.array(ids[0], np.int32)  # a writable copy


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
    return _equal_gates(ids_BSK, expert_load(ids_BSK, num_experts))


NO_PREVIOUS_TOKEN = -1  # the previous id of a sequence's first token


def previous_tokens(token_ids_BS: jax.Array) -> jax.Array:
    """[B,S] the token before each one in its row; ``NO_PREVIOUS_TOKEN`` at position 0."""
    first_B1 = jnp.full_like(token_ids_BS[:, :1], NO_PREVIOUS_TOKEN)
    return jnp.concatenate([first_B1, token_ids_BS[:, :-1]], axis=1)


def bigram_ids(prev_ids_BS: jax.Array, token_ids_BS: jax.Array) -> jax.Array:
    """uint32 [B,S] id of each (previous token, token) pair: a bijective mix of the previous id,
    xor-ed with the current one (distinct pairs collide only as 32-bit hashes do)."""
    prev = _mix32(prev_ids_BS.astype(jnp.uint32) ^ jnp.uint32(0xB5297A4D))
    return prev ^ token_ids_BS.astype(jnp.uint32)


def bigram_hash_route(prev_ids_BS, token_ids_BS, num_experts: int, k: int, seed: int) -> Routing:
    """Hash routing on the bigram: equal (previous, current) pairs always go to equal experts."""
    return _fixed_route(hash_scores(bigram_ids(prev_ids_BS, token_ids_BS), num_experts, seed), k)


def random_route(key: jax.Array, positions_BS: jax.Array, num_experts: int, k: int) -> Routing:
    """Uniformly random k distinct experts per token.

    Token (b, s) draws from ``fold_in(fold_in(key, b), positions[b, s])``: its batch row and its
    position in the sequence, nothing else. So the draw does not depend on the device layout, and
    decoding one position at a time (KV cache) routes exactly as the full sequence does.
    """
    return _fixed_route(token_uniforms(key, positions_BS, num_experts), k)


def token_uniforms(key: jax.Array, positions_BS: jax.Array, n: int) -> jax.Array:
    """[B,S,n] uniforms; token (b, s) draws from ``fold_in(fold_in(key, b), positions[b, s])``."""
    b = positions_BS.shape[0]
    rows_BS = jnp.zeros_like(positions_BS) + jnp.arange(b, dtype=positions_BS.dtype)[:, None]

    def draw(row, position):
        return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, row), position), (n,))

    return jax.vmap(jax.vmap(draw))(rows_BS, positions_BS)


def gshard_route(logits_BSE: jax.Array, key: jax.Array, positions_BS: jax.Array, threshold: float) -> Routing:
    """GShard top-2: the best expert always; the second with probability min(1, g2 / threshold),
    g2 its gate after normalising the top two (GShard's random routing; Mesh-TF's "random"
    second policy). An unused second choice has expert id E (none) and gate 0 and takes no
    capacity; first choices are placed before second ones. The token draws its uniform as the
    random router does (layout-invariant). The load-balance loss uses first choices (GShard)."""
    logits_BSE = logits_BSE.astype(jnp.float32)
    e = logits_BSE.shape[-1]
    probs_BSE = jax.nn.softmax(logits_BSE, axis=-1)
    top_BS2, ids_BS2 = top_k(probs_BSE, 2)
    gates_BS2 = top_BS2 / jnp.sum(top_BS2, axis=-1, keepdims=True)
    u_BS = token_uniforms(key, positions_BS, 1)[..., 0]
    second_BS = u_BS < jax.lax.stop_gradient(gates_BS2[..., 1]) / threshold
    ids_BS2 = jnp.stack([ids_BS2[..., 0], jnp.where(second_BS, ids_BS2[..., 1], e)], axis=-1)
    gates_BS2 = gates_BS2 * jnp.stack([jnp.ones_like(second_BS), second_BS], axis=-1).astype(jnp.float32)
    routed_E = jnp.sum(jax.nn.one_hot(ids_BS2, e, dtype=jnp.float32), axis=(0, 1, 2))  # E (none) is all zeros
    return Routing(
        expert_ids=ids_BS2,
        gates=gates_BS2,
        aux_loss=load_balance_loss(probs_BSE, expert_load(ids_BS2[..., :1], e)),
        z_loss=router_z_loss(logits_BSE),
        expert_load=routed_E / jnp.sum(routed_E),
        router_entropy=router_entropy(logits_BSE, probs_BSE),
    )


def thor_expert(key: jax.Array, num_experts: int) -> jax.Array:
    """THOR's draw for one layer and batch: an int32 scalar, uniform over the experts."""
    return jax.random.randint(key, (), 0, num_experts, dtype=jnp.int32)


def single_expert_route(expert: jax.Array, like_BS: jax.Array, num_experts: int) -> Routing:
    """Every token to ``expert`` with gate 1 (ids take ``like_BS``'s shape and sharding)."""
    ids_BS1 = (jnp.zeros_like(like_BS, dtype=jnp.int32) + expert)[..., None]
    return _equal_gates(ids_BS1, jax.nn.one_hot(expert, num_experts, dtype=jnp.float32), single_expert=expert)


def expert_choice_route(
    logits_BSE: jax.Array, group_tokens: int, capacity: int, group_spec=None, out_spec=None
) -> Routing:
    """Expert choice (Zhou et al. 2022): in each group of ``group_tokens`` consecutive tokens (in
    (batch, seq) order) every expert takes the ``capacity`` tokens with the highest router
    probability for it (ties to the earlier token); a chosen token's gate is that probability.

    Returned token-side with K = E slots: slot e holds expert e if it chose the token, else E
    (none) with gate 0, so both dispatches run it unchanged. No load-balance loss (each expert
    takes exactly C tokens). Under an explicit mesh ``group_spec`` is the [G, Tg, E] spec and
    ``out_spec`` the [B, S, E] one.
    """
    logits_BSE = logits_BSE.astype(jnp.float32)
    b, s, e = logits_BSE.shape
    probs_BSE = jax.nn.softmax(logits_BSE, axis=-1)
    probs_GTE = probs_BSE.reshape(b * s // group_tokens, group_tokens, e, out_sharding=group_spec)
    scores_GET = jax.lax.stop_gradient(jnp.swapaxes(probs_GTE, 1, 2))
    values_GEC, index_GEC = jax.lax.top_k(scores_GET, capacity)
    # chosen = ranked within the top C; top_k puts equal scores in token order, so a token tied
    # with the C-th is chosen iff it comes no later than the C-th
    kth_GE1, kth_index_GE1 = values_GEC[..., -1:], index_GEC[..., -1:]
    token_T = jnp.arange(group_tokens)
    chosen_GET = (scores_GET > kth_GE1) | ((scores_GET == kth_GE1) & (token_T <= kth_index_GE1))
    chosen_GTE = jnp.swapaxes(chosen_GET, 1, 2)
    ids_BSE = jnp.where(chosen_GTE, jnp.arange(e, dtype=jnp.int32), e).reshape(b, s, e, out_sharding=out_spec)
    gates_BSE = jnp.where(chosen_GTE, probs_GTE, 0.0).reshape(b, s, e, out_sharding=out_spec)
    taken_E = jnp.sum(chosen_GTE, axis=(0, 1)).astype(jnp.float32)
    return Routing(
        expert_ids=ids_BSE,
        gates=gates_BSE,
        aux_loss=jnp.zeros((), jnp.float32),
        z_loss=router_z_loss(logits_BSE),
        expert_load=taken_E / jnp.sum(taken_E),
        router_entropy=router_entropy(logits_BSE, probs_BSE),
        unrouted_fraction=jnp.mean(~jnp.any(chosen_GTE, axis=-1)),
    )
