"""The model's typed configuration: ``TransformerConfig`` with its MoE section ``MoEConfig`` and its
MLA section ``MLAConfig``, and ``FFNConfig``, the shape of one feed-forward network (dense, or each
expert); the MoE layer's two live in ``moe.layer_config`` and are re-exported here.

Every setting lives in exactly one place: ``TransformerConfig.moe`` is the MoE layer's own
config (the command line sets it as ``--config.model.moe.router=hash``), and the layer's FFN
shape is derived from the model (``TransformerConfig.ffn``). ``check()`` raises ``FieldError``
naming the field, so a caller can label it (``config.model.moe.router=...``) without parsing text.
"""

from __future__ import annotations

import dataclasses
import math

from moe.fields import FieldError, StrictFields, finite, positive_int, resumable
from moe.layer_config import (  # noqa: F401 - re-exported: the model's config names them all
    ACTIVATIONS,
    CAPACITY_PRIORITIES,
    DISPATCHES,
    DTYPES,
    NORM_TOPK,
    FFNConfig,
    MoEConfig,
)

# model.scan_layers: "on" runs the repeating block pattern as one jax.lax.scan over stacked
# parameters (compile time and compile memory independent of depth); "auto" does so from
# SCAN_MIN_LAYERS blocks on (shallower models compile in seconds either way, and keep the unrolled
# layout they always had); "off" unrolls every block.
SCAN_MODES = ("auto", "on", "off")
SCAN_MIN_LAYERS = 8
# model.remat: what each block keeps for the backward pass (the rest is recomputed there):
#   none            everything (no rematerialisation)
#   full            only the block's input
#   save_dots       the outputs of every matmul (attention projections and scores, FFN and experts)
#   save_exchange   the MoE layer's all_to_all results, so the backward pass repeats no exchange
#   save_dots_exchange  both of the above
REMAT_POLICIES = ("none", "full", "save_dots", "save_exchange", "save_dots_exchange")
# model.attention: "mha" multi-head attention with optional grouped keys/values (num_kv_heads < num_heads,
# GQA), QK-norm and biases; "mla" DeepSeek's multi-head latent attention (model.mla)
ATTENTIONS = ("mha", "mla")
# model.qk_norm: RMSNorm of queries and keys before RoPE: "head" over each head's dimension (Qwen3),
# "proj" over the whole projection (all heads together, OLMoE), "none"
QK_NORMS = ("none", "head", "proj")


@dataclasses.dataclass
class MLAConfig(StrictFields):
    """DeepSeek's multi-head latent attention (``model.attention="mla"``): queries through an optional
    low-rank bottleneck, keys and values from one shared latent of ``kv_lora_rank`` (what the KV cache
    keeps, with the RoPE key), each head's key a part without position (``nope_head_dim``) and a RoPE
    part shared by all heads (``rope_head_dim``)."""

    q_lora_rank: int = 0  # 0 = queries projected directly from the model width
    kv_lora_rank: int = 64
    nope_head_dim: int = 32
    rope_head_dim: int = 16
    v_head_dim: int = 32
    # the epsilon of the two latent RMSNorms (queries', keys'/values'); 0 = the model's norm_eps.
    # DeepSeek's checkpoints use 1e-6 there whatever their rms_norm_eps.
    latent_norm_eps: float = 0.0

    def check(self) -> MLAConfig:
        if not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 0:
            self._fail("q_lora_rank", "must be an integer >= 0 (0 = no query compression)")
        for name in ("kv_lora_rank", "nope_head_dim", "rope_head_dim", "v_head_dim"):
            if not positive_int(getattr(self, name)):
                self._fail(name, "must be a positive integer")
        if self.rope_head_dim % 2:
            self._fail("rope_head_dim", "must be even (RoPE)")
        if not (finite(self.latent_norm_eps) and self.latent_norm_eps >= 0):
            self._fail("latent_norm_eps", "must be >= 0 (0 = the model's norm_eps)")
        return self


ROPE_SCALINGS = ("none", "yarn")


@dataclasses.dataclass
class RopeScaling(StrictFields):
    """RoPE for contexts longer than the pretraining one (``model.rope_scaling``): YaRN (Peng et al.
    2023) interpolates the low frequencies by ``factor``, keeps the high ones, ramps between the
    dimensions that turn ``beta_fast`` and ``beta_slow`` times over ``original_max_positions``, and
    scales cos and sin by ``attention_factor`` (0: ``0.1 ln(factor) + 1``, or the ratio of the two
    mscale terms when both are set). Multi-head latent attention also multiplies its softmax scale by
    ``(0.1 mscale_all_dim ln(factor) + 1)^2``, as DeepSeek does. Computed as ``transformers`` does."""

    kind: str = "none"  # see ROPE_SCALINGS
    factor: float = 1.0
    original_max_positions: int = 0  # the pretraining context
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 0.0  # 0 = from factor (and mscale, mscale_all_dim)
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    truncate: bool = True  # round the ramp's ends to whole dimensions

    def check(self) -> RopeScaling:
        self._choose("kind", ROPE_SCALINGS)
        if self.kind == "none":
            return self
        if not (finite(self.factor) and self.factor >= 1):
            self._fail("factor", "must be >= 1")
        if not positive_int(self.original_max_positions):
            self._fail("original_max_positions", "must be a positive integer (the pretraining context)")
        for name in ("beta_fast", "beta_slow"):
            if not (finite(getattr(self, name)) and getattr(self, name) > 0):
                self._fail(name, "must be > 0")
        for name in ("attention_factor", "mscale", "mscale_all_dim"):
            if not (finite(getattr(self, name)) and getattr(self, name) >= 0):
                self._fail(name, "must be >= 0 (0 = unset)")
        return self

    def key(self) -> tuple | None:
        """The settings as a hashable value for the model's static structure; None: plain RoPE."""
        return None if self.kind == "none" else dataclasses.astuple(self)


@dataclasses.dataclass
class TransformerConfig(StrictFields):
    """A decoder-only language model; also the ``model`` section of the run config."""

    vocab_size: int = 0  # 0 = the tokenizer's vocabulary, rounded up to a multiple of 64
    num_layers: int = 4
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int = 0  # key/value heads (grouped-query attention); 0 = num_heads
    head_dim: int = 0  # 0 = d_model // num_heads
    attention: str = "mha"  # see ATTENTIONS
    mla: MLAConfig = dataclasses.field(default_factory=MLAConfig)  # attention="mla" only
    qk_norm: str = "none"  # see QK_NORMS
    attn_bias: bool = False  # biases on the query, key and value projections (Qwen2, GPT-OSS)
    attn_out_bias: bool = False  # a bias on the attention's output projection (GPT-OSS)
    # attention sinks: a learned logit per head beside every query's keys in the softmax (GPT-OSS), so a
    # head can attend to nothing
    attn_sinks: bool = False
    # sliding-window attention: a query sees its own position and the sliding_window - 1 before it; 0 = all
    sliding_window: int = 0
    # with sliding_window: every n-th block (blocks n-1, 2n-1, ...) attends to every earlier position
    # (GPT-OSS: 2, windowed and full blocks alternate); 0 = every block is windowed
    full_attention_every: int = 0
    norm_eps: float = 1e-6  # every RMSNorm's epsilon
    d_ff: int = 512  # hidden width of dense FFN blocks (and of experts unless moe.expert_d_ff)
    activation: str = "silu"
    gated: bool = True
    ffn_bias: bool = False  # biases on every FFN's projections, the experts' included (GPT-OSS)
    # GPT-OSS's clamped SwiGLU: gate <= limit, -limit <= up <= limit, (up + 1) * gate * sigmoid(alpha gate);
    # 0 = the plain GLU act(gate) * up
    swiglu_limit: float = 0.0
    swiglu_alpha: float = 1.702
    moe_every: int = 1  # every n-th block has an MoE FFN (blocks n-1, 2n-1, ...); 0 = dense model
    first_dense_layers: int = 0  # the first n blocks are dense whatever moe_every says (DeepSeek)
    moe: MoEConfig = dataclasses.field(default_factory=MoEConfig)
    # expert_choice or moe.capacity_priority="choice" let a token's output depend on later tokens:
    # refused for this causal language model unless set (for routing studies; the losses are then
    # not causal LM losses)
    allow_non_causal_router: bool = False
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    dtype: str = "float32"  # activations; the router is always float32
    param_dtype: str = "float32"
    # scan the repeating block pattern (one dense-or-MoE period of moe_every blocks) over stacked
    # parameters: "auto" (from 8 layers on), "on", "off"; see SCAN_MODES
    scan_layers: str = resumable("auto")
    remat: str = resumable("none")  # what a block keeps for its backward pass; see REMAT_POLICIES

    def check(self) -> TransformerConfig:
        """The model's rules, each stated once: raise ``FieldError("TransformerConfig", field, ...)``,
        a section's field dotted (``moe.router``, ``mla.kv_lora_rank``)."""
        for name in ("num_layers", "d_model", "num_heads", "d_ff"):
            if getattr(self, name) < 1:
                self._fail(name, "must be >= 1")
        if self.vocab_size < 0:
            self._fail("vocab_size", "must be >= 0 (0 = from the tokenizer)")
        if self.head_dim < 0:
            self._fail("head_dim", "must be >= 0 (0 = d_model / num_heads)")
        if not self.head_dim and self.d_model % self.num_heads:
            self._fail("d_model", f"must be divisible by model.num_heads={self.num_heads}")
        if not self.head_dim and (self.d_model // self.num_heads) % 2:
            self._fail("num_heads", "head dimension d_model/num_heads must be even (RoPE)")
        if self.head_dim % 2:
            self._fail("head_dim", "must be even (RoPE)")
        if self.num_kv_heads < 0 or self.num_heads % max(self.num_kv_heads, 1):
            self._fail("num_kv_heads", f"must divide model.num_heads={self.num_heads} (0 = num_heads)")
        self._choose("attention", ATTENTIONS)
        self._choose("qk_norm", QK_NORMS)
        mha_only = ("qk_norm", "attn_bias", "attn_out_bias", "attn_sinks", "sliding_window", "num_kv_heads")
        if self.attention != "mha" and any(getattr(self, name) not in (0, "none") for name in mha_only):
            self._fail("attention", f"mla has its own key/value layout: leave {', '.join(mha_only)} unset")
        for name in ("sliding_window", "full_attention_every"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 0:
                self._fail(name, "must be an integer >= 0 (0 = none)")
        if self.full_attention_every and not self.sliding_window:
            self._fail("full_attention_every", "needs model.sliding_window > 0 (the other blocks' window)")
        if not (finite(self.norm_eps) and self.norm_eps > 0):
            self._fail("norm_eps", "must be > 0")
        if type(self.first_dense_layers) is not int or not 0 <= self.first_dense_layers <= self.num_layers:
            self._fail("first_dense_layers", f"must be an integer in [0, model.num_layers={self.num_layers}]")
        if self.attention == "mla":
            self._check_part("mla", self.mla)
        if self.moe_every < 0:
            self._fail("moe_every", "must be >= 0 (0 = dense model)")
        self._check_part("", self.ffn())  # activation, dtype, param_dtype: FFNConfig's rules
        if not self.rope_theta > 0:
            self._fail("rope_theta", "must be > 0")
        self._check_part("rope_scaling", self.rope_scaling)
        self._choose("scan_layers", SCAN_MODES)
        self._choose("remat", REMAT_POLICIES)
        self._check_part("moe", self.moe)
        router = self.moe.router_class
        if not self.moe_every and router.consistency_weight(self.moe):
            self._fail("moe_every", f"moe.router={router.name!r} asks for a consistency loss, which needs MoE blocks "
                       "(> 0); or set the router's consistency weight to 0")
        reason = self.non_causal_reason()
        if reason and not self.allow_non_causal_router:
            field, why = reason
            raise FieldError("TransformerConfig", f"moe.{field}", getattr(self.moe, field), f"{why} (non-causal): "
                             "a causal LM would see the future; set model.allow_non_causal_router=True to train it "
                             "anyway for a routing study")
        return self

    def ffn(self, expert: bool = False, shared: bool = False) -> FFNConfig:
        """The shape of the dense FFN blocks, of each expert (``expert``), or of the shared experts."""
        d_ff = (self.moe.expert_d_ff or self.d_ff) if expert else self.moe.shared_d_ff if shared else self.d_ff
        return FFNConfig(self.d_model, d_ff, self.activation, self.gated, self.dtype, self.param_dtype, self.ffn_bias,
                         self.swiglu_limit, self.swiglu_alpha)

    def attention_window(self, index: int) -> int:
        """The positions a query of block ``index`` sees, its own included (0: every earlier one)."""
        if not self.sliding_window or (self.full_attention_every and (index + 1) % self.full_attention_every == 0):
            return 0
        return self.sliding_window

    def is_moe_block(self, index: int) -> bool:
        return self.moe_every > 0 and index >= self.first_dense_layers and (index + 1) % self.moe_every == 0

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_width(self) -> int:
        """Each attention head's dimension (H): ``head_dim``, or d_model / num_heads."""
        return self.head_dim or self.d_model // self.num_heads

    @property
    def first_scanned(self) -> int:
        """The first block of the scanned stack: blocks before it (the dense ``first_dense_layers``,
        rounded up to a whole pattern) run unrolled."""
        return -(-self.first_dense_layers // self.period) * self.period

    @property
    def num_moe_layers(self) -> int:
        return sum(1 for i in range(self.num_layers) if self.is_moe_block(i))

    @property
    def period(self) -> int:
        """Blocks in one repeat of the pattern: ``moe_every`` (the last of them MoE; 1 when dense), and a
        whole number of windowed/full attention cycles (``full_attention_every``)."""
        return math.lcm(self.moe_every or 1, self.full_attention_every or 1)

    @property
    def scan_repeats(self) -> int:
        """How many times the block pattern is scanned (0 = every block unrolled). Blocks before
        ``first_scanned`` run unrolled before the scan, blocks left after the last whole repeat after it."""
        repeats = (self.num_layers - self.first_scanned) // self.period
        if self.scan_layers == "off" or repeats < 2:
            return 0
        if self.scan_layers == "auto" and self.num_layers < SCAN_MIN_LAYERS:
            return 0
        return repeats

    def non_causal_reason(self) -> tuple[str, str] | None:
        """``(field, why)`` when an MoE block's output for a token may depend on later tokens, else None."""
        return self.moe.non_causal_reason() if self.moe_every else None

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
        return f"model.moe.{field}={getattr(self.moe, field)!r}: {why} (non-causal)"
