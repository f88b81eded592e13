"""What Qwen2-MoE and Qwen3-MoE share (``QwenMoe``, registered by neither): fine-grained experts
(``moe_intermediate_size``), an MoE layer every ``decoder_sparse_step`` blocks, the first blocks
dense (``mlp_only_layers``)."""

from __future__ import annotations

from moe.config import MoEConfig, TransformerConfig
from train.interop.families.base import Family, InteropError, _get, num_experts, on_off


class QwenMoe(Family):
    first_dense = True
    moe_every_block = False

    def read(self, hf: dict, cfg: TransformerConfig, moe: MoEConfig, where: str) -> None:
        moe.num_experts = num_experts(hf, where)
        moe.expert_d_ff = int(_get(hf, "moe_intermediate_size", where=where))
        moe.norm_topk_prob = on_off(hf.get("norm_topk_prob"))
        cfg.moe_every = int(hf.get("decoder_sparse_step", 1))
        only = sorted(hf.get("mlp_only_layers") or [])
        if only != list(range(len(only))):
            raise InteropError(f"{where}: mlp_only_layers={only}: only the first blocks can be dense")
        cfg.first_dense_layers = len(only)

    def hf_fields(self, cfg: TransformerConfig, norm: bool) -> dict:
        return dict(num_experts=cfg.moe.num_experts, moe_intermediate_size=cfg.moe.expert_d_ff or cfg.d_ff,
                    norm_topk_prob=norm, decoder_sparse_step=cfg.moe_every,
                    mlp_only_layers=list(range(cfg.first_dense_layers)), use_sliding_window=False, sliding_window=None)
