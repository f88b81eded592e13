"""MoEConfig: the typed description of one MoE feed-forward layer, validated on construction."""

from __future__ import annotations

import dataclasses
import math

ROUTERS = (
    "topk", "frozen", "gshard", "loss_free", "expert_choice", "hash", "balanced_hash", "bigram_hash", "random", "thor",
)
LEARNED_ROUTERS = ("topk", "frozen", "gshard", "loss_free", "expert_choice")  # routers with a router_w [D, E]
# Routers whose choice for a token depends on other tokens of its group, later ones included:
# a causal language model must not use them (``TransformerConfig.allow_non_causal_router``;
# ``non_causal_reason`` also covers capacity_priority="choice").
NON_CAUSAL_ROUTERS = ("expert_choice",)
ACTIVATIONS = ("gelu", "silu", "relu")
DTYPES = ("float32", "bfloat16")
DISPATCHES = ("capacity", "dropless")
# Which assignments of a capacity group get an expert's slots first. "token": token by token in
# (batch, sequence) order, a token's first choice before its second; an earlier token's slots
# never depend on later tokens (causal). "choice": GShard's order, every first choice before
# any second choice; a later token's first choice can evict an earlier token's second (non-causal).
CAPACITY_PRIORITIES = ("token", "choice")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """One MoE feed-forward layer.

    Every invalid field raises ``ValueError("MoEConfig.<field>=...: why")`` at construction,
    before anything is traced.
    """

    d_model: int
    d_ff: int
    num_experts: int = 8
    experts_per_token: int = 1
    # "topk" (learned), "frozen" (top-k with router weights fixed at initialisation),
    # "gshard" (top-2, the second expert used with probability min(1, gate / gshard_threshold)),
    # "loss_free" (top-k on scores plus a per-expert bias nudged toward balance, no aux loss),
    # "hash" (Hash Layers), "balanced_hash" (a token -> expert table balanced on training-set
    # frequencies), "bigram_hash" (hash of the previous and current token), "random",
    # "thor" (THOR: one random expert for the whole batch in training, a random expert per token
    # with a fixed seed in eval), "expert_choice" (each expert takes its top-C tokens of a
    # capacity group; non-causal: C = the capacity below)
    router: str = "topk"
    # "capacity": fixed slots per expert, overflow dropped (the static-shape classic);
    # "dropless": every assignment is computed (worst-case buffer or ragged_all_to_all, grouped matmul)
    dispatch: str = "capacity"
    # slots per expert = ceil(cf * k * group_tokens / E); for expert_choice, the number of
    # tokens each expert takes from a group (k = the mean number of experts per token)
    capacity_factor: float = 1.25
    # order in which a group's assignments take slots (see CAPACITY_PRIORITIES)
    capacity_priority: str = "token"
    # Capacity when the layer is in eval mode (``layer.eval()``); None = no token is ever dropped.
    eval_capacity_factor: float | None = None
    # Tokens that share one capacity budget. None = all tokens on one device (the usual
    # per-device rule). A fixed size makes drops independent of the mesh layout, as long as
    # each device holds a whole number of groups.
    capacity_group_size: int | None = None
    activation: str = "gelu"
    gated: bool = True  # GLU (SwiGLU with silu) when True; plain wi/wo MLP when False
    aux_loss_coef: float = 0.01  # Switch load-balance loss coefficient
    z_loss_coef: float = 1e-3  # router z-loss coefficient
    router_jitter: float = 0.0  # multiplicative router-input noise in training: x * U(1-eps, 1+eps)
    hash_seed: int = 0  # seeds the hash router's token -> expert table
    gshard_threshold: float = 0.2  # gshard: the second expert is used with probability min(1, g2 / this)
    loss_free_gamma: float = 1e-3  # loss_free: bias step per training step toward equal load
    vocab_size: int = 0  # token ids the balanced_hash table covers (required for that router)
    # seeds the fixed draws of random, gshard and thor in eval mode (the transformer gives every
    # layer its own: the block index)
    eval_seed: int = 0
    dtype: str = "float32"  # activation / expert compute dtype; the router is always float32
    param_dtype: str = "float32"

    def __post_init__(self):
        def fail(name, why):
            raise ValueError(f"MoEConfig.{name}={getattr(self, name)!r}: {why}")

        for name in ("d_model", "d_ff", "num_experts", "experts_per_token"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(name, "must be a positive integer")
        if self.router not in ROUTERS:
            fail("router", f"unknown router; choose one of {', '.join(ROUTERS)}")
        if self.dispatch not in DISPATCHES:
            fail("dispatch", f"choose one of {', '.join(DISPATCHES)}")
        if self.capacity_priority not in CAPACITY_PRIORITIES:
            fail("capacity_priority", f"choose one of {', '.join(CAPACITY_PRIORITIES)}")
        if self.router == "gshard" and self.experts_per_token != 2:
            fail("experts_per_token", "the gshard router is top-2: set it to 2")
        if self.router == "thor" and self.experts_per_token != 1:
            fail("experts_per_token", "the thor router sends each token to one expert: set it to 1")
        if not _positive_finite(self.loss_free_gamma):
            fail("loss_free_gamma", "must be a number > 0")
        if not _positive_finite(self.gshard_threshold):
            fail("gshard_threshold", "must be a number > 0")
        if self.router == "balanced_hash" and (not isinstance(self.vocab_size, int) or self.vocab_size < 1):
            fail("vocab_size", "the balanced_hash router needs the vocabulary size (>= 1)")
        if self.experts_per_token > self.num_experts:
            fail("experts_per_token", f"cannot exceed num_experts={self.num_experts}")
        if not _positive_finite(self.capacity_factor):
            fail("capacity_factor", "must be a number > 0")
        if self.eval_capacity_factor is not None and not _positive_finite(self.eval_capacity_factor):
            fail("eval_capacity_factor", "must be a number > 0 or None (no drops)")
        if self.capacity_group_size is not None and (
            not isinstance(self.capacity_group_size, int) or self.capacity_group_size < 1
        ):
            fail("capacity_group_size", "must be a positive integer or None")
        if self.activation not in ACTIVATIONS:
            fail("activation", f"unknown activation; choose one of {', '.join(ACTIVATIONS)}")
        if not isinstance(self.gated, bool):
            fail("gated", "must be True or False")
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                fail(name, "must be a finite number >= 0")
        if not isinstance(self.router_jitter, (int, float)) or not 0 <= self.router_jitter < 1:
            fail("router_jitter", "must be in [0, 1)")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                fail(name, f"choose one of {', '.join(DTYPES)}")

    def non_causal_reason(self) -> tuple[str, str] | None:
        """``(field, why)`` when a token's output may depend on later tokens of its sequence, else None."""
        return non_causal_reason(self.router, self.dispatch, self.experts_per_token, self.capacity_priority)

    def uses_capacity_groups(self, deterministic: bool) -> bool:
        """Whether the capacity group size changes anything: an assignment can overflow (training,
        or eval with ``eval_capacity_factor``), or the router ranks a group's tokens (expert choice)."""
        if self.dispatch == "dropless" and self.router != "expert_choice":
            return False
        return not deterministic or self.eval_capacity_factor is not None or self.router == "expert_choice"

    def capacity(self, group_tokens: int, deterministic: bool = False) -> int:
        """Slots per expert for a group of ``group_tokens`` tokens (C in the shape names)."""
        cf = self.eval_capacity_factor if deterministic else self.capacity_factor
        if cf is None and self.router == "expert_choice":  # capacity is how many tokens each expert takes
            cf = self.capacity_factor
        if cf is None:  # no drops: an expert can receive each token of the group at most once
            return group_tokens
        slots = math.ceil(cf * self.experts_per_token * group_tokens / self.num_experts)
        return max(1, min(slots, group_tokens))

    @property
    def active_ffn_flops_per_token(self) -> int:
        """Forward FLOPs of the expert FFNs one token uses (k experts), router excluded."""
        mats = 3 if self.gated else 2
        return 2 * mats * self.d_model * self.d_ff * self.experts_per_token


def non_causal_reason(router: str, dispatch: str, k: int, capacity_priority: str) -> tuple[str, str] | None:
    """``(field, why)`` when these routing settings let a later token change an earlier token's
    output (through routing or through who gets a capacity slot); None when they never do.

    ``expert_choice`` ranks a group's tokens against each other; ``capacity_priority="choice"``
    (with capacity dispatch and k > 1) lets a later token's first choice take the last slot an
    earlier token's second choice would have had.
    """
    if router in NON_CAUSAL_ROUTERS:
        return "router", "routes each token by later tokens of its group"
    if capacity_priority == "choice" and dispatch == "capacity" and k > 1:
        return "capacity_priority", "gives every first choice a slot before any second choice, so a later token can take an earlier token's slot"
    return None


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


class StrictFields:
    """A mutable dataclass that refuses attributes it does not declare, so that a misspelt field
    in a config file (``cfg.train.step = 5``) is an error instead of a silent no-op."""

    def __setattr__(self, name, value):
        names = [f.name for f in dataclasses.fields(self)]
        if name not in names:
            import difflib

            close = difflib.get_close_matches(name, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise AttributeError(f"{type(self).__name__} has no field {name!r}{hint}")
        object.__setattr__(self, name, value)


@dataclasses.dataclass
class TransformerConfig(StrictFields):
    """A decoder-only language model; also the ``model`` section of the run config."""

    vocab_size: int = 0  # 0 = the tokenizer's vocabulary, rounded up to a multiple of 64
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    d_ff: int = 512  # hidden width of dense FFN blocks
    moe_every: int = 1  # every n-th block has an MoE FFN (blocks n-1, 2n-1, ...); 0 = dense model
    num_experts: int = 8
    experts_per_token: int = 1
    expert_d_ff: int = 0  # hidden width of each expert; 0 = d_ff
    router: str = "topk"
    dispatch: str = "capacity"  # or "dropless": no capacity, nothing dropped
    capacity_factor: float = 1.25
    eval_capacity_factor: float = 0.0  # capacity in evaluation; 0 = no token is dropped
    capacity_group_size: int = 0  # 0 = all tokens on one device share the capacity
    activation: str = "silu"
    gated: bool = True
    aux_loss_coef: float = 0.01  # per MoE layer; the layers' router losses are summed (Switch, GShard)
    z_loss_coef: float = 1e-3  # per MoE layer, summed likewise
    router_jitter: float = 0.0
    hash_seed: int = 0
    gshard_threshold: float = 0.2
    loss_free_gamma: float = 1e-3
    # thor: weight of THOR's consistency loss, the symmetric KL between the predictions of two
    # forward passes through independently drawn experts (0 = one pass, no consistency loss)
    thor_consistency: float = 0.0
    # capacity slots go token by token ("token", causal) or first choices first ("choice",
    # GShard's order: a later token can evict an earlier one, so refused unless allowed below)
    capacity_priority: str = "token"
    # expert_choice or capacity_priority="choice" let a token's output depend on later tokens:
    # refused for this causal language model unless set (for routing studies; the losses are then
    # not causal LM losses)
    allow_non_causal_router: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    dtype: str = "float32"  # activations; the router is always float32
    param_dtype: str = "float32"

    def moe_config(self, layer: int = 0) -> MoEConfig:
        """The MoE layer of block ``layer``: its fixed evaluation draws (random, gshard, thor) are
        seeded by the block index, so that every layer draws independently."""
        return MoEConfig(
            d_model=self.d_model,
            d_ff=self.expert_d_ff or self.d_ff,
            num_experts=self.num_experts,
            experts_per_token=self.experts_per_token,
            router=self.router,
            dispatch=self.dispatch,
            capacity_factor=self.capacity_factor,
            capacity_priority=self.capacity_priority,
            eval_capacity_factor=self.eval_capacity_factor or None,
            capacity_group_size=self.capacity_group_size or None,
            activation=self.activation,
            gated=self.gated,
            aux_loss_coef=self.aux_loss_coef,
            z_loss_coef=self.z_loss_coef,
            router_jitter=self.router_jitter,
            hash_seed=self.hash_seed,
            gshard_threshold=self.gshard_threshold,
            loss_free_gamma=self.loss_free_gamma,
            vocab_size=self.vocab_size,
            eval_seed=layer,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )

    def non_causal_reason(self) -> tuple[str, str] | None:
        """``(field, why)`` when an MoE block's output for a token may depend on later tokens, else None."""
        if not self.moe_every:
            return None
        return non_causal_reason(self.router, self.dispatch, self.experts_per_token, self.capacity_priority)

    @property
    def non_causal_routing(self) -> bool:
        """Whether a token's output may depend on later tokens of its sequence (see ``non_causal_reason``)."""
        return self.non_causal_reason() is not None

    def non_causal_message(self) -> str:
        """One line naming the field that makes this model non-causal (empty when it is causal)."""
        reason = self.non_causal_reason()
        if reason is None:
            return ""
        field, why = reason
        return f"model.{field}={getattr(self, field)!r}: {why} (non-causal)"

    def is_moe_block(self, index: int) -> bool:
        return self.moe_every > 0 and (index + 1) % self.moe_every == 0
