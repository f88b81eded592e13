"""DeepSeek-V3 (``DeepseekV3ForCausalLM``): multi-head latent attention (MLA), the first blocks dense
(``first_k_dense_replace``), sigmoid scores routed in groups with a loss-free bias
(``e_score_correction_bias``, model state), routed scaling, shared experts a whole number of experts wide.

Its rotary parts are stored in interleaved pairs (``rope_interleave``): their rows are reordered,
evens then odds, into the rotate-half layout Switchyard computes (the dot products are unchanged),
and back on export. Its multi-token-prediction layers (``num_nextn_predict_layers``) are not read.
"""

from __future__ import annotations

import numpy as np

from moe.config import MLAConfig, MoEConfig, TransformerConfig
from moe.routers.sigmoid import Sigmoid
from train.interop.families import register
from train.interop.families.base import TRANSPOSE, Family, Table, _get, _heads_in, _heads_out, _refuse, on_off

# DeepseekV3RMSNorm's default: the latent norms (q_a_layernorm, kv_a_layernorm) are built without
# the config's rms_norm_eps
LATENT_NORM_EPS = 1e-6


def _rope_perm(nope: int, rope: int, interleaved: bool) -> np.ndarray | None:
    """Columns [nope part, rotary part] with the rotary part's interleaved pairs as evens then odds."""
    if not interleaved:
        return None
    return np.concatenate([np.arange(nope), nope + np.concatenate([np.arange(0, rope, 2), np.arange(1, rope, 2)])])


def _latent_in(perm):
    """kv_a_proj [Z+O, D] <-> [D, Z+O], the rotary columns reordered."""
    return (lambda w: np.ascontiguousarray(w.T[:, perm] if perm is not None else w.T),
            lambda w: np.ascontiguousarray((w[:, np.argsort(perm)] if perm is not None else w).T),
            lambda shape: shape[::-1])


@register
class DeepseekV3(Family):
    name, hf_class, priority = "deepseek_v3", "DeepseekV3ForCausalLM", 40
    reads_head_dim = False
    routers = (Sigmoid.name,)
    attention = "mla"
    first_dense = True
    shared_expert = "shared_experts"
    router_bias = "e_score_correction_bias"

    def matches(self, cfg: TransformerConfig) -> bool:
        return cfg.attention == self.attention

    def unread_layers(self, hf: dict):
        return hf.get("num_nextn_predict_layers")

    def read(self, hf: dict, cfg: TransformerConfig, moe: MoEConfig, where: str) -> None:
        _refuse(hf, "attention_bias", lambda v: not v, "attention biases are not supported", where)
        _refuse(hf, "moe_layer_freq", lambda v: v == 1, "only an MoE layer in every block after the dense ones", where)
        # DeepSeek's scoring_func and the router computing it share the name
        _refuse(hf, "scoring_func", lambda v: v == Sigmoid.name, "only sigmoid scores are supported", where)
        _refuse(hf, "topk_method", lambda v: v == "noaux_tc", "only noaux_tc (group-limited, biased) routing", where)
        cfg.attention = self.attention
        cfg.mla = MLAConfig(q_lora_rank=int(hf.get("q_lora_rank") or 0),
                            kv_lora_rank=int(_get(hf, "kv_lora_rank", where=where)),
                            nope_head_dim=int(_get(hf, "qk_nope_head_dim", where=where)),
                            rope_head_dim=int(_get(hf, "qk_rope_head_dim", where=where)),
                            v_head_dim=int(_get(hf, "v_head_dim", where=where)),
                            latent_norm_eps=LATENT_NORM_EPS)
        cfg.first_dense_layers = int(hf.get("first_k_dense_replace", 0))
        moe.num_experts = int(_get(hf, "n_routed_experts", where=where))
        moe.expert_d_ff = int(_get(hf, "moe_intermediate_size", where=where))
        moe.shared_d_ff = int(hf.get("n_shared_experts") or 0) * moe.expert_d_ff
        moe.router, moe.aux_loss_coef = Sigmoid.name, 1e-4
        routing = Sigmoid.options_of(moe)
        routing.num_groups, routing.topk_groups = int(hf.get("n_group") or 1), int(hf.get("topk_group") or 1)
        routing.routed_scaling = float(hf.get("routed_scaling_factor", 1.0))
        moe.norm_topk_prob = on_off(hf.get("norm_topk_prob", True))

    def hf_fields(self, cfg: TransformerConfig, norm: bool) -> dict:
        m, d, routing = cfg.moe, cfg.mla, Sigmoid.options_of(cfg.moe)
        f = m.expert_d_ff or cfg.d_ff
        shared = m.shared_d_ff // f
        self.need(cfg, (d.latent_norm_eps or cfg.norm_eps) == LATENT_NORM_EPS, "mla.latent_norm_eps",
                  f"{self.name}'s q_a_layernorm and kv_a_layernorm use {LATENT_NORM_EPS}")
        self.need(cfg, shared * f == m.shared_d_ff, "moe.shared_d_ff",
                  f"{self.name}'s shared experts are a whole number of experts wide")
        return dict(n_routed_experts=m.num_experts, moe_intermediate_size=f, n_shared_experts=shared or None,
                    first_k_dense_replace=cfg.first_dense_layers, moe_layer_freq=1, n_group=routing.num_groups,
                    topk_group=routing.topk_groups, routed_scaling_factor=routing.routed_scaling, norm_topk_prob=norm,
                    q_lora_rank=d.q_lora_rank or None, kv_lora_rank=d.kv_lora_rank, qk_nope_head_dim=d.nope_head_dim,
                    qk_rope_head_dim=d.rope_head_dim, v_head_dim=d.v_head_dim, head_dim=d.rope_head_dim,
                    rope_interleave=True, attention_bias=False, scoring_func=Sigmoid.name, topk_method="noaux_tc")

    def attention_tensors(self, t: Table, cfg: TransformerConfig, ours: str, hf: str, interleaved: bool) -> None:
        """MLA: queries (through a low-rank latent when q_lora_rank), the shared key/value latent with
        its rotary key, their norms, and the output projection."""
        c, d, n = cfg.mla, cfg.d_model, cfg.num_heads
        qk = c.nope_head_dim + c.rope_head_dim
        perm = _rope_perm(c.nope_head_dim, c.rope_head_dim, interleaved)
        if c.q_lora_rank:
            t.add(f"{ours}/wq_a", f"{hf}.q_a_proj.weight", (d, c.q_lora_rank), TRANSPOSE)
            t.add(f"{ours}/q_norm/scale", f"{hf}.q_a_layernorm.weight", (c.q_lora_rank,))
            t.add(f"{ours}/wq", f"{hf}.q_b_proj.weight", (c.q_lora_rank, n, qk), _heads_in(n, qk, perm))
        else:
            t.add(f"{ours}/wq", f"{hf}.q_proj.weight", (d, n, qk), _heads_in(n, qk, perm))
        lat_perm = None if perm is None else np.concatenate(
            [np.arange(c.kv_lora_rank), c.kv_lora_rank + perm[c.nope_head_dim:] - c.nope_head_dim])
        t.add(f"{ours}/wkv_a", f"{hf}.kv_a_proj_with_mqa.weight", (d, c.kv_lora_rank + c.rope_head_dim),
              _latent_in(lat_perm))
        t.add(f"{ours}/kv_norm/scale", f"{hf}.kv_a_layernorm.weight", (c.kv_lora_rank,))
        t.add(f"{ours}/wkv_b", f"{hf}.kv_b_proj.weight", (c.kv_lora_rank, n, c.nope_head_dim + c.v_head_dim),
              _heads_in(n, c.nope_head_dim + c.v_head_dim))
        t.add(f"{ours}/wo", f"{hf}.o_proj.weight", (n, c.v_head_dim, d), _heads_out(n, c.v_head_dim))
