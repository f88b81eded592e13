"""GPT-OSS (``GptOssForCausalLM``): attention with q/k/v/o biases, a learned sink logit per head
(``sinks``), sliding-window and full attention blocks alternating (``layer_types``, ``sliding_window``),
experts with biases and a clamped SwiGLU (``swiglu_limit``, ``swiglu_alpha``), a router with a bias
whose top-k logits are softmaxed (the same gates as the full softmax renormalised), YaRN without
truncation. Its experts are stored whole, [E, ...] per layer, the gate and up projections
interleaved in one tensor (``gate_up_proj``: gate at even columns, up at odd); the release ships
them as MXFP4 (``train.interop.quantized``), read dequantized."""

from __future__ import annotations

import numpy as np

from moe.config import MoEConfig, RopeScaling, TransformerConfig
from train.interop.families import register
from train.interop.families.base import TRANSPOSE, Family, InteropError, Table, _reshape, num_experts

SLIDING, FULL = "sliding_attention", "full_attention"
# GptOssConfig's rope_parameters when config.json has none
DEFAULT_YARN = RopeScaling("yarn", factor=32.0, original_max_positions=4096, beta_fast=32.0, beta_slow=1.0,
                           truncate=False)


def _interleaved(part: int):
    """One of the two projections interleaved on the last axis (``part`` 0: even columns, 1: odd)."""
    return (lambda w: np.ascontiguousarray(w[..., part::2]), lambda w: w,
            lambda shape: (*shape[:-1], 2 * shape[-1]))


def _interleave(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.stack([gate, up], axis=-1).reshape(*gate.shape[:-1], 2 * gate.shape[-1]))


@register
class GptOss(Family):
    name, hf_class, priority = "gpt_oss", "GptOssForCausalLM", 50
    experts_at_d_ff = True
    attn_bias = attn_out_bias = attn_sinks = ffn_bias = clamped_swiglu = learned_router_bias = True
    sliding_windows = True
    defaults = {**Family.defaults, "rms_norm_eps": 1e-5, "rope_theta": 150_000.0, "num_key_value_heads": 8}

    def matches(self, cfg: TransformerConfig) -> bool:
        return cfg.attn_sinks or cfg.ffn_bias or bool(cfg.swiglu_limit)

    def read(self, hf: dict, cfg: TransformerConfig, moe: MoEConfig, where: str) -> None:
        moe.num_experts = num_experts(hf, where)
        moe.expert_d_ff, moe.norm_topk_prob, moe.router_bias = cfg.d_ff, "on", True
        if not bool(hf.get("attention_bias", True)):
            raise InteropError(f"{where}: attention_bias=False: {self.name}'s attention has biases")
        cfg.attn_bias = cfg.attn_out_bias = cfg.attn_sinks = cfg.ffn_bias = True
        cfg.swiglu_limit = float(hf.get("swiglu_limit", 7.0))
        cfg.swiglu_alpha = float(hf.get("swiglu_alpha", 1.702))
        if not any(hf.get(key) for key in ("rope_parameters", "rope_scaling")):
            cfg.rope_scaling = DEFAULT_YARN
        head_dim = int(hf.get("head_dim") or 64)  # GptOssConfig's when absent
        cfg.head_dim = 0 if head_dim == cfg.d_model // cfg.num_heads else head_dim
        n = cfg.num_layers
        types = hf.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(n)]
        window = hf.get("sliding_window", 128)
        if len(types) != n or set(types) - {SLIDING, FULL}:
            raise InteropError(f"{where}: layer_types={types!r}: one of {SLIDING!r}, {FULL!r} per layer needed")
        if SLIDING in types and not (isinstance(window, int) and window > 0):
            raise InteropError(f"{where}: sliding_window={window!r}: a positive integer needed for its sliding layers")
        cfg.sliding_window = int(window) if SLIDING in types else 0
        cfg.full_attention_every = self._full_every(types) if SLIDING in types else 0
        if cfg.full_attention_every is None:
            raise InteropError(f"{where}: layer_types={types!r}: full attention every n-th layer only "
                               "(blocks n-1, 2n-1, ...), or none")

    @staticmethod
    def _full_every(types: list[str]) -> int | None:
        """n when the full-attention layers are exactly n-1, 2n-1, ... (0 when there are none)."""
        for n in [0, *range(1, len(types) + 1)]:
            if types == [FULL if n and (i + 1) % n == 0 else SLIDING for i in range(len(types))]:
                return n
        return None

    def hf_fields(self, cfg: TransformerConfig, norm: bool) -> dict:
        self.need(cfg, norm, "moe.norm_topk_prob", f"{self.name} softmaxes the chosen logits (renormalised gates)")
        types = [SLIDING if cfg.attention_window(i) else FULL for i in range(cfg.num_layers)]
        # plain RoPE said so: without a RoPE key GptOssConfig (and ``read``) take YaRN
        plain = {} if cfg.rope_scaling.kind != "none" else {"rope_scaling": {"rope_type": "default"}}
        return dict(num_local_experts=cfg.moe.num_experts, head_dim=cfg.head_width, attention_bias=True,
                    sliding_window=cfg.sliding_window or None, layer_types=types, swiglu_limit=cfg.swiglu_limit,
                    swiglu_alpha=cfg.swiglu_alpha, **plain)

    def attention_tensors(self, t: Table, cfg: TransformerConfig, ours: str, hf: str, interleaved: bool) -> None:
        super().attention_tensors(t, cfg, ours, hf, interleaved)
        n, j, h, d = cfg.num_heads, cfg.kv_heads, cfg.head_width, cfg.d_model
        for x, heads in (("q", n), ("k", j), ("v", j)):
            t.add(f"{ours}/b{x}", f"{hf}.{x}_proj.bias", (heads, h), _reshape((heads, h)))
        t.add(f"{ours}/bo", f"{hf}.o_proj.bias", (d,))
        t.add(f"{ours}/sinks", f"{hf}.sinks", (n,))

    def moe_tensors(self, t: Table, cfg: TransformerConfig, b: str, moe: str) -> None:
        m, d = cfg.moe, cfg.d_model
        e, f = m.num_experts, m.expert_d_ff or cfg.d_ff
        t.add(f"{b}/ffn/router/w", f"{moe}.router.weight", (d, e), TRANSPOSE)
        t.add(f"{b}/ffn/router/b", f"{moe}.router.bias", (e,))
        experts = f"{moe}.experts"
        t.joined([f"{b}/ffn/wg", f"{b}/ffn/wi"], f"{experts}.gate_up_proj", (e, d, f),
                 [_interleaved(0), _interleaved(1)], _interleave)
        t.joined([f"{b}/ffn/bg", f"{b}/ffn/bi"], f"{experts}.gate_up_proj_bias", (e, f),
                 [_interleaved(0), _interleaved(1)], _interleave)
        t.add(f"{b}/ffn/wo", f"{experts}.down_proj", (e, f, d))
        t.add(f"{b}/ffn/bo", f"{experts}.down_proj_bias", (e, d))
