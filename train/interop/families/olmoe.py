"""OLMoE (``OlmoeForCausalLM``): RMS-norm over the whole query and key projections (``q_norm`` /
``k_norm``, [heads * head_dim]), experts as wide as the model's d_ff, no clipping, no biases."""

from __future__ import annotations

from moe.config import MoEConfig, TransformerConfig
from train.interop.families import register
from train.interop.families.base import Family, Table, _reshape, _refuse, num_experts, on_off


@register
class Olmoe(Family):
    defaults = {**Family.defaults, "rms_norm_eps": 1e-5, "router_aux_loss_coef": 0.01}
    name, hf_class, priority = "olmoe", "OlmoeForCausalLM", 30
    qk_norm = "proj"
    experts_at_d_ff = True

    def matches(self, cfg: TransformerConfig) -> bool:
        return cfg.qk_norm == self.qk_norm

    def read(self, hf: dict, cfg: TransformerConfig, moe: MoEConfig, where: str) -> None:
        moe.num_experts = num_experts(hf, where)
        moe.expert_d_ff = cfg.d_ff
        moe.norm_topk_prob = on_off(hf.get("norm_topk_prob"))
        _refuse(hf, "clip_qkv", lambda v: v is None, "clipped q/k/v are not supported", where)
        _refuse(hf, "attention_bias", lambda v: not v, "attention biases are not supported", where)
        cfg.qk_norm = self.qk_norm

    def hf_fields(self, cfg: TransformerConfig, norm: bool) -> dict:
        return dict(num_experts=cfg.moe.num_experts, norm_topk_prob=norm, clip_qkv=None, attention_bias=False)

    def attention_tensors(self, t: Table, cfg: TransformerConfig, ours: str, hf: str, interleaved: bool) -> None:
        super().attention_tensors(t, cfg, ours, hf, interleaved)
        n, j, h = cfg.num_heads, cfg.kv_heads, cfg.head_width
        t.add(f"{ours}/q_norm/scale", f"{hf}.q_norm.weight", (n, h), _reshape((n, h)))
        t.add(f"{ours}/k_norm/scale", f"{hf}.k_norm.weight", (j, h), _reshape((j, h)))
