"""The router interface, and the statistics every router reports.

Shape letters (see ``moe/__init__.py``): B batch, S sequence, D model width, E experts,
K experts per token.

A router is an ``nnx.Module`` holding its own parameters and state (``w`` router weights,
``bias``, ``table``, an RNG stream ``rngs``). Calling it with a ``RouteInput`` returns a
``Routing``: per token, K expert ids (best first) and their gates, plus the router losses and
statistics over the global batch. A family's own settings are its ``Options`` dataclass
(``model.moe.router_options.<name>.<field>``; ``options`` on an instance). Routing is per-token math on global arrays, outside any
``shard_map``, so it is the same on 1 device or 64; random draws are keyed by the token's global
position, never by the device. A router class also says whether it is causal, checks the
settings it needs, and may learn once per training step (``update``) or from the training
split's token counts before training (``fit``).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moe.fields import FieldError

if TYPE_CHECKING:
    from moe.config import MoEConfig
from moe.params import spec_of

ACT_AXES = ("batch", "seq", "act_embed")
NO_PREVIOUS_TOKEN = -1  # ``RouteInput.prev_token_ids_BS`` of a sequence's first token
ROUTE_AXES = ("batch", "seq", None)


class Routing(NamedTuple):
    expert_ids: jax.Array  # [B,S,K] int32, k distinct experts per token, best first; E = none
    gates: jax.Array  # [B,S,K] float32
    aux_loss: jax.Array  # scalar, Switch load-balance loss E * sum_i f_i P_i (unweighted; 1 when balanced)
    z_loss: jax.Array  # scalar, mean over tokens of logsumexp(logits)^2 (unweighted)
    expert_load: jax.Array  # [E] share of the B*S*K assignments sent to each expert (sums to 1)
    router_entropy: jax.Array  # scalar, mean entropy (nats) of the router distribution; 0 without one
    # a router whose drops are its own choices reports them (expert_choice: the share of tokens no
    # expert took; they pass through the residual); None = the dispatch's overflow is the drop
    dropped_fraction: jax.Array | None = None
    # int32 scalar when every token goes to this one expert (THOR in training): the layer then
    # runs that expert on all tokens with no dispatch
    single_expert: jax.Array | None = None
    # a router's own training objective, already weighted, added to the router loss (stable: the
    # distillation of its choices into its token -> expert table)
    own_loss: jax.Array | None = None


@dataclasses.dataclass
class RouteInput:
    """What a router may look at, for one batch (global arrays)."""

    x_BSD: jax.Array
    token_ids_BS: jax.Array | None
    positions_BS: jax.Array  # each token's position in its sequence (random draws are keyed by it)
    prev_token_ids_BS: jax.Array | None = None  # bigram_hash; None = token_ids shifted right
    key: jax.Array | None = None  # an explicit key for this call's draws (else the router's stream)
    group_tokens: int = 0  # tokens per capacity group (expert_choice ranks within a group)
    # keys the fixed evaluation draws instead of the router's own ``eval_seed`` (the block index;
    # a traced int32 when the blocks are scanned); None = the router's
    eval_seed: jax.Array | int | None = None


class Router(nnx.Module):
    """One routing family. Subclasses set ``name`` and implement ``__call__``."""

    name: ClassVar[str]
    causal: ClassVar[bool] = True  # False: a token's route may depend on later tokens of its group
    stochastic: ClassVar[bool] = False  # draws random numbers (its own RNG stream)
    ranks_group: ClassVar[bool] = False  # the capacity group matters even when nothing is dropped
    wants_token_counts: ClassVar[bool] = False  # ``fit`` learns from the training split's token counts
    consistency: ClassVar[bool] = False  # two passes draw different experts (see ``consistency_weight``)
    scores_tokens: ClassVar[bool] = False  # learned weights score each token (``LearnedRouter``)
    # The family's own settings: a ``StrictFields`` dataclass with defaults and a ``check()`` that
    # raises ``FieldError`` for a bad field (each field on its own); ``MoEConfig.router_options``
    # holds one per router name. None: the router has none.
    Options: ClassVar[type | None] = None

    @classmethod
    def options_of(cls, cfg: MoEConfig):
        """This router's settings in ``cfg`` (its section of ``cfg.router_options``), or None."""
        return getattr(cfg.router_options, cls.name) if cls.Options is not None else None

    @property
    def options(self):
        return self.options_of(self.cfg)

    @classmethod
    def check(cls, cfg: MoEConfig) -> None:
        """Raise ``FieldError`` for settings this router cannot use together with the layer's (its
        own options are checked field by field before, by their ``check()``)."""

    @classmethod
    def option_error(cls, cfg: MoEConfig, field: str, why: str) -> FieldError:
        """The ``FieldError`` of this router's option ``field``, named as ``MoEConfig`` names it."""
        value = getattr(cls.options_of(cfg), field)
        return FieldError("MoEConfig", f"router_options.{cls.name}.{field}", value, why)

    @classmethod
    def consistency_weight(cls, cfg: MoEConfig) -> float:
        """The weight of the consistency objective this router asks training for (0: none, the plain
        loss): two forward passes draw their experts independently, and the symmetric KL between their
        predictions, times this weight, joins the loss; logged as ``<name>/consistency``."""
        return 0.0

    @classmethod
    def need_k(cls, cfg: MoEConfig, k: int, why: str) -> None:
        if cfg.experts_per_token != k:
            raise FieldError("MoEConfig", "experts_per_token", cfg.experts_per_token, f"{why}: set it to {k}")

    def __init__(self, cfg: MoEConfig, d_model: int, *, key: jax.Array, rngs: nnx.Rngs, eval_seed: int = 0,
                 vocab_size: int = 0):
        """``key`` initialises the router's parameters; ``rngs["routing"]`` is forked for its
        draws; ``eval_seed`` keys its fixed draws in eval mode (the LM passes the block index)."""
        self.cfg = cfg
        self.deterministic = False
        self.eval_seed = eval_seed
        self.rngs = rngs["routing"].fork() if self.stochastic or cfg.router_jitter > 0 else nnx.data(None)

    def __call__(self, inp: RouteInput) -> Routing:
        raise NotImplementedError

    def update(self, expert_load_E: jax.Array) -> None:
        """Once per training step, after the gradients, from the whole step's load (no-op here)."""

    def fit(self, token_counts_V) -> None:
        """Before training, from the training split's token counts (``wants_token_counts``)."""

    def capacity(self, group_tokens: int, deterministic: bool) -> int:
        """Slots per expert (C) for a capacity group of ``group_tokens`` tokens: the config's
        (``MoEConfig.capacity``); a router whose expected load is known may size them otherwise.
        A Python int: shapes are fixed at compile time."""
        return self.cfg.capacity(group_tokens, deterministic, always=self.ranks_group)

    @classmethod
    def slot_scale(cls, cfg) -> float:
        """How many times ``capacity_factor``'s slots this router's ``capacity`` gives (memory
        estimates read it; 1 unless a router sizes its own)."""
        return 1.0

    # ---------------------------------------------------------------- shared by the subclasses
    def draw_key(self, inp: RouteInput) -> jax.Array:
        """The key of this call's draws: ``inp.key``, else the fixed eval key (``inp.eval_seed`` or
        the router's), else the next from the stream."""
        if inp.key is not None:
            return inp.key
        if self.deterministic:
            return jax.random.key(self.eval_seed if inp.eval_seed is None else inp.eval_seed)
        return self.rngs()


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
        masked = jnp.where(experts_E.reshape((1,) * best.ndim + (-1,)) == best[..., None], -jnp.inf, masked)
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


def equal_gates(ids_BSK: jax.Array, load_E: jax.Array, **extra) -> Routing:
    """Routing with no router distribution: gates 1/k, no router losses, entropy 0."""
    k = ids_BSK.shape[-1]
    zero = jnp.zeros((), jnp.float32)
    return Routing(ids_BSK, jnp.full(ids_BSK.shape, 1.0 / k, jnp.float32), zero, zero, load_E, zero, **extra)


def fixed_route(scores_BSE: jax.Array, k: int) -> Routing:
    """The top-k scores choose; gates 1/k."""
    _, ids_BSK = top_k(scores_BSE, k)
    return equal_gates(ids_BSK, expert_load(ids_BSK, scores_BSE.shape[-1]))


def token_uniforms(key: jax.Array, positions_BS: jax.Array, n: int) -> jax.Array:
    """[B,S,n] uniforms; token (b, s) draws from ``fold_in(fold_in(key, b), positions[b, s])``:
    its batch row and its position in the sequence, nothing else. So the draw does not depend on
    the device layout, and decoding one position at a time (KV cache) draws as the full sequence."""
    b = positions_BS.shape[0]
    rows_BS = jnp.zeros_like(positions_BS) + jnp.arange(b, dtype=positions_BS.dtype)[:, None]

    def draw(row, position):
        return jax.random.uniform(jax.random.fold_in(jax.random.fold_in(key, row), position), (n,))

    return jax.vmap(jax.vmap(draw))(rows_BS, positions_BS)


def route_spec():
    """The [B,S,K] spec of routing outputs under the current mesh (the batch's), or None."""
    return spec_of(ROUTE_AXES)
