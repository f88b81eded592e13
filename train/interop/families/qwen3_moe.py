"""Qwen3-MoE (``Qwen3MoeForCausalLM``): RMS-norm over each head's queries and keys (``q_norm`` /
``k_norm``, [head_dim]), its own ``head_dim``, no biases, and what every Qwen MoE has (``qwen_moe``)."""

from __future__ import annotations

from moe.config import MoEConfig, TransformerConfig
from train.interop.families import register
from train.interop.families.base import Table, _refuse
from train.interop.families.qwen_moe import QwenMoe


@register
class Qwen3Moe(QwenMoe):
    defaults = {**QwenMoe.defaults, "num_key_value_heads": 4}
    name, hf_class, priority = "qwen3_moe", "Qwen3MoeForCausalLM", 20
    qk_norm = "head"

    def matches(self, cfg: TransformerConfig) -> bool:
        return cfg.qk_norm == self.qk_norm

    def read(self, hf: dict, cfg: TransformerConfig, moe: MoEConfig, where: str) -> None:
        super().read(hf, cfg, moe, where)
        _refuse(hf, "attention_bias", lambda v: not v, "attention biases (q, k, v and o) are not supported", where)
        cfg.qk_norm = self.qk_norm

    def hf_fields(self, cfg: TransformerConfig, norm: bool) -> dict:
        return dict(super().hf_fields(cfg, norm), head_dim=cfg.head_width, attention_bias=False)

    def attention_tensors(self, t: Table, cfg: TransformerConfig, ours: str, hf: str, interleaved: bool) -> None:
        super().attention_tensors(t, cfg, ours, hf, interleaved)
        t.add(f"{ours}/q_norm/scale", f"{hf}.q_norm.weight", (cfg.head_width,))
        t.add(f"{ours}/k_norm/scale", f"{hf}.k_norm.weight", (cfg.head_width,))
