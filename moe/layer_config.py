"""The MoE layer's typed configuration: ``MoEConfig`` (its experts, router, dispatch and router losses)
and ``FFNConfig``, the shape of one feed-forward network (dense, or each expert). ``check()`` raises
``FieldError`` naming the field. ``moe.config`` re-exports both with the model's ``TransformerConfig``.
A router family's own settings are not fields here: each router declares them (``moe.routers``) and
``MoEConfig.router_options`` holds them, a section per router.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import TYPE_CHECKING

from moe.fields import FieldError, StrictFields, finite, positive_finite, positive_int, resumable

if TYPE_CHECKING:
    from moe.routers import RouterOptions

ACTIVATIONS = ("gelu", "silu", "relu")
DTYPES = ("float32", "bfloat16")
DISPATCHES = ("capacity", "dropless")
# Which assignments of a capacity group get an expert's slots first. "token": token by token in
# (batch, sequence) order, a token's first choice before its second; an earlier token's slots
# never depend on later tokens (causal). "choice": GShard's order, every first choice before
# any second choice; a later token's first choice can evict an earlier token's second (non-causal).
CAPACITY_PRIORITIES = ("token", "choice")
# moe.norm_topk_prob: whether a learned router's k chosen gates are divided by their sum. "auto": when
# k > 1 (Mixtral; Switch's k = 1 keeps its probability); "on" always; "off" never (Qwen2-MoE, OLMoE)
NORM_TOPK = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class FFNConfig:
    """The shape of one feed-forward network: a dense FFN, or each expert of an MoE layer."""

    d_model: int
    d_ff: int
    activation: str = "silu"
    gated: bool = True  # GLU (SwiGLU with silu) when True; plain wi/wo MLP when False
    dtype: str = "float32"  # activations and matmul inputs; the router is always float32
    param_dtype: str = "float32"
    ffn_bias: bool = False  # a bias after each projection
    swiglu_limit: float = 0.0  # > 0: GPT-OSS's clamped SwiGLU (moe.experts.glu); 0 = act(gate) * up
    swiglu_alpha: float = 1.702  # the clamped SwiGLU's sigmoid gain

    def check(self) -> FFNConfig:
        for name in ("d_model", "d_ff"):
            if not positive_int(getattr(self, name)):
                raise FieldError("FFNConfig", name, getattr(self, name), "must be a positive integer")
        if self.activation not in ACTIVATIONS:
            raise FieldError("FFNConfig", "activation", self.activation, f"choose one of {', '.join(ACTIVATIONS)}")
        if not isinstance(self.gated, bool):
            raise FieldError("FFNConfig", "gated", self.gated, "must be True or False")
        for name in ("dtype", "param_dtype"):
            if getattr(self, name) not in DTYPES:
                raise FieldError("FFNConfig", name, getattr(self, name), f"choose one of {', '.join(DTYPES)}")
        if not isinstance(self.ffn_bias, bool):
            raise FieldError("FFNConfig", "ffn_bias", self.ffn_bias, "must be True or False")
        if not (finite(self.swiglu_limit) and self.swiglu_limit >= 0):
            raise FieldError("FFNConfig", "swiglu_limit", self.swiglu_limit, "must be >= 0 (0 = the plain GLU)")
        if self.swiglu_limit and not (self.gated and self.activation == "silu"):
            raise FieldError("FFNConfig", "swiglu_limit", self.swiglu_limit,
                             "the clamped SwiGLU needs gated=True and activation='silu'")
        if not (finite(self.swiglu_alpha) and self.swiglu_alpha > 0):
            raise FieldError("FFNConfig", "swiglu_alpha", self.swiglu_alpha, "must be > 0")
        return self


def _router_options():
    from moe.routers import RouterOptions

    return RouterOptions()


@dataclasses.dataclass
class MoEConfig(StrictFields):
    """One MoE feed-forward layer: its experts, router, dispatch and router losses.

    ``check()`` raises ``FieldError("MoEConfig", field, ...)`` for an invalid field; the router
    named by ``router`` checks its options (``router_options.<router>``) and the settings it needs.
    """

    num_experts: int = 8
    experts_per_token: int = 1
    expert_d_ff: int = 0  # hidden width of each expert; 0 = the model's d_ff
    # one of moe.routers.ROUTERS: "topk", "frozen", "gshard", "loss_free", "expert_choice", "hash",
    # "balanced_hash", "bigram_hash", "random", "thor", "sigmoid", "stable" (see the README's router list)
    router: str = "topk"
    # "capacity": fixed slots per expert, overflow dropped (the static-shape classic);
    # "dropless": every assignment is computed (worst-case buffer or ragged_all_to_all, grouped matmul)
    dispatch: str = "capacity"
    # slots per expert = ceil(cf * k * group_tokens / E); for expert_choice, the number of
    # tokens each expert takes from a group (k = the mean number of experts per token)
    capacity_factor: float = 1.25
    # order in which a group's assignments take slots (see CAPACITY_PRIORITIES); "choice" is non-causal
    capacity_priority: str = "token"
    eval_capacity_factor: float = 0.0  # capacity in eval mode (layer.eval()); 0 = no token is ever dropped
    # tokens that share one capacity budget; 0 = all tokens on one device (the usual per-device
    # rule). A fixed size makes drops independent of the mesh layout, as long as each device
    # holds a whole number of groups.
    capacity_group_size: int = 0
    aux_loss_coef: float = 0.01  # Switch load-balance loss, per MoE layer (the LM sums its layers')
    z_loss_coef: float = 1e-3  # router z-loss, per MoE layer, summed likewise
    router_jitter: float = 0.0  # multiplicative router-input noise in training: x * U(1-eps, 1+eps)
    # each router's own settings, a section per router name (moe.routers.RouterOptions; only this
    # layer's router's section is read): router_options.stable.freeze_step, router_options.hash.seed...
    router_options: RouterOptions = dataclasses.field(default_factory=_router_options)
    # dropless: exchange only the real rows with ragged_all_to_all (GPU/TPU; XLA:CPU cannot run
    # it) instead of an all_to_all of the worst-case buffer. Set by the program for its backend.
    ragged_exchange: bool = resumable(False, run_time=True)
    # dropless: the grouped matmul of the experts (moe.grouped_matmul.GROUPED_MATMULS): "auto" (Megablox on
    # TPU, tokamax's kernels on GPU when installed, jax.lax.ragged_dot otherwise), or one of "ragged_dot",
    # "megablox" (Pallas interpret mode off TPU: slow, for tests), "tokamax" (pip install 'switchyard[gpu]')
    grouped_matmul: str = resumable("auto", run_time=True)
    norm_topk_prob: str = "auto"  # see NORM_TOPK
    router_bias: bool = False  # a learned bias on a learned router's logits (GPT-OSS)
    # shared experts: a dense FFN of this hidden width beside the routed experts, seen by every token
    # (DeepSeek: n_shared_experts * expert width; Qwen2-MoE: shared_expert_intermediate_size); 0 = none
    shared_d_ff: int = 0
    shared_gate: bool = False  # scale the shared experts' output by sigmoid(x . w) (Qwen2-MoE)

    def check(self) -> MoEConfig:
        from moe.routers import ROUTERS

        for name in ("num_experts", "experts_per_token"):
            if not positive_int(getattr(self, name)):
                self._fail(name, "must be a positive integer")
        if not isinstance(self.expert_d_ff, int) or self.expert_d_ff < 0:
            self._fail("expert_d_ff", "must be an integer >= 0 (0 = the model's d_ff)")
        if self.router not in ROUTERS:
            self._fail("router", f"unknown router; choose one of {', '.join(ROUTERS)}")
        self._choose("dispatch", DISPATCHES)
        from moe.grouped_matmul import GROUPED_MATMULS

        self._choose("grouped_matmul", GROUPED_MATMULS)
        self._choose("capacity_priority", CAPACITY_PRIORITIES)
        self._choose("norm_topk_prob", NORM_TOPK)
        if not isinstance(self.shared_d_ff, int) or isinstance(self.shared_d_ff, bool) or self.shared_d_ff < 0:
            self._fail("shared_d_ff", "must be an integer >= 0 (0 = no shared experts)")
        if not isinstance(self.shared_gate, bool):
            self._fail("shared_gate", "must be True or False")
        if self.shared_gate and not self.shared_d_ff:
            self._fail("shared_gate", "gates the shared experts: set shared_d_ff > 0 too")
        if self.experts_per_token > self.num_experts:
            self._fail("experts_per_token", f"cannot exceed num_experts={self.num_experts}")
        if not positive_finite(self.capacity_factor):
            self._fail("capacity_factor", "must be a number > 0")
        if not finite(self.eval_capacity_factor) or self.eval_capacity_factor < 0:
            self._fail("eval_capacity_factor", "must be a number >= 0 (0 = no drops)")
        if not isinstance(self.capacity_group_size, int) or self.capacity_group_size < 0:
            self._fail("capacity_group_size", "must be an integer >= 0 (0 = all tokens of a device)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if not finite(getattr(self, name)) or getattr(self, name) < 0:
                self._fail(name, "must be a finite number >= 0")
        if not finite(self.router_jitter) or not 0 <= self.router_jitter < 1:
            self._fail("router_jitter", "must be in [0, 1)")
        from moe.routers import RouterOptions

        if not isinstance(self.router_options, RouterOptions):
            self._fail("router_options", "must be a moe.routers.RouterOptions (a section per router)")
        self._check_part("router_options", self.router_options)
        if not isinstance(self.router_bias, bool):
            self._fail("router_bias", "must be True or False")
        if self.router_bias and not ROUTERS[self.router].scores_tokens:
            self._fail("router_bias", f"router={self.router!r} has no learned scores to bias")
        ROUTERS[self.router].check(self)
        return self

    @classmethod
    def moved(cls) -> dict[str, tuple[str, ...]]:
        from moe.routers import FORMERLY

        return FORMERLY

    def with_router(self, router: str, **options) -> MoEConfig:
        """A copy routed by ``router``, with these of its options set:
        ``cfg.with_router("stable", freeze_step=3)``."""
        out = dataclasses.replace(self, router=router, router_options=copy.deepcopy(self.router_options))
        if options:
            if not hasattr(out.router_options, router):
                raise AttributeError(f"router {router!r} has no options (given {', '.join(options)})")
            section = getattr(out.router_options, router)
            for name, value in options.items():
                setattr(section, name, value)
        return out

    @property
    def router_class(self):
        from moe.routers import ROUTERS

        return ROUTERS[self.router]

    def non_causal_reason(self) -> tuple[str, str] | None:
        """``(field, why)`` when a token's output may depend on later tokens of its sequence (through
        routing, or through who gets a capacity slot); None when it never does."""
        if not self.router_class.causal:
            return "router", "routes each token by later tokens of its group"
        if self.capacity_priority == "choice" and self.dispatch == "capacity" and self.experts_per_token > 1:
            return "capacity_priority", (
                "gives every first choice a slot before any second choice, so a later token can take an earlier "
                "token's slot"
            )
        return None

    def slots(self, group_tokens: int, capacity_factor: float) -> int:
        """ceil(cf * k * group / E) slots per expert, at least 1 and at most the group."""
        slots = math.ceil(capacity_factor * self.experts_per_token * group_tokens / self.num_experts)
        return max(1, min(slots, group_tokens))

    def capacity(self, group_tokens: int, deterministic: bool = False, always: bool = False) -> int:
        """Slots per expert for a group of ``group_tokens`` tokens (C in the shape names): the
        whole group (nothing dropped) when the capacity factor in use is 0, unless ``always``
        (expert choice: capacity is how many tokens each expert takes), which then falls back to
        ``capacity_factor``."""
        cf = self.eval_capacity_factor if deterministic else self.capacity_factor
        if always and not cf:
            cf = self.capacity_factor
        return self.slots(group_tokens, cf) if cf else group_tokens

    def can_drop(self, deterministic: bool) -> bool:
        """Whether an assignment can overflow its expert's capacity."""
        if self.dispatch == "dropless":
            return False
        return not deterministic or self.eval_capacity_factor > 0
