"""Qwen2-MoE (``Qwen2MoeForCausalLM``): q/k/v biases (``qkv_bias``), a shared expert behind a sigmoid
gate (``shared_expert_intermediate_size``), and what every Qwen MoE has (``qwen_moe``)."""

from __future__ import annotations

from moe.config import MoEConfig, TransformerConfig
from train.interop.families import register
from train.interop.families.base import Table, _reshape
from train.interop.families.qwen_moe import QwenMoe


@register
class Qwen2Moe(QwenMoe):
    defaults = {**QwenMoe.defaults, "num_key_value_heads": 16}
    name, hf_class, priority = "qwen2_moe", "Qwen2MoeForCausalLM", 10
    attn_bias = True
    shared_expert = "shared_expert"
    gates_shared = True

    def matches(self, cfg: TransformerConfig) -> bool:
        return bool(cfg.attn_bias or cfg.moe.shared_d_ff)

    def read(self, hf: dict, cfg: TransformerConfig, moe: MoEConfig, where: str) -> None:
        super().read(hf, cfg, moe, where)
        cfg.attn_bias = bool(hf.get("qkv_bias", True))
        moe.shared_d_ff = int(hf.get("shared_expert_intermediate_size") or 0)
        moe.shared_gate = bool(moe.shared_d_ff)

    def hf_fields(self, cfg: TransformerConfig, norm: bool) -> dict:
        m = cfg.moe
        self.need(cfg, m.shared_gate == bool(m.shared_d_ff), "moe.shared_gate", f"{self.name} gates its shared expert")
        return dict(super().hf_fields(cfg, norm), shared_expert_intermediate_size=m.shared_d_ff, qkv_bias=cfg.attn_bias)

    def attention_tensors(self, t: Table, cfg: TransformerConfig, ours: str, hf: str, interleaved: bool) -> None:
        super().attention_tensors(t, cfg, ours, hf, interleaved)
        if cfg.attn_bias:
            n, j, h = cfg.num_heads, cfg.kv_heads, cfg.head_width
            for x, heads in (("q", n), ("k", j), ("v", j)):
                t.add(f"{ours}/b{x}", f"{hf}.{x}_proj.bias", (heads, h), _reshape((heads, h)))
