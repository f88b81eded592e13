"""Mixtral (``MixtralForCausalLM``): GQA, experts as wide as the model's d_ff, top-k gates always
renormalised; its experts' projections are w1 (gate), w3 (up), w2 (down) under ``block_sparse_moe``."""

from __future__ import annotations

from moe.config import MoEConfig, TransformerConfig
from train.interop.families import register
from train.interop.families.base import Family, _get


@register
class Mixtral(Family):
    name, hf_class, priority = "mixtral", "MixtralForCausalLM", 0
    sliding_window_default = True
    experts_at_d_ff = True
    moe_module = "block_sparse_moe"
    expert_names = ("w1", "w3", "w2")
    defaults = {**Family.defaults, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_key_value_heads": 8}

    def matches(self, cfg: TransformerConfig) -> bool:
        return True  # the plain one: any model no other family claims

    def read(self, hf: dict, cfg: TransformerConfig, moe: MoEConfig, where: str) -> None:
        moe.num_experts = int(_get(hf, "num_local_experts", where=where))
        moe.expert_d_ff, moe.norm_topk_prob = cfg.d_ff, "on"

    def hf_fields(self, cfg: TransformerConfig, norm: bool) -> dict:
        self.need(cfg, norm, "moe.norm_topk_prob", f"{self.name} always renormalises the chosen gates")
        return dict(num_local_experts=cfg.moe.num_experts, sliding_window=None)
