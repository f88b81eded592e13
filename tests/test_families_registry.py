"""The Hugging Face families' registry (``train.interop.families``), without JAX: a tiny model of each
family survives config.json -> TransformerConfig -> config.json -> TransformerConfig, its architecture is
inferred back from its pieces, and a family is registered once, at a priority of its own."""

from __future__ import annotations

import json

import pytest

from train.interop.families import (
    ARCHITECTURES,
    FAMILIES,
    Family,
    InteropError,
    from_hf_config,
    infer_architecture,
    register,
    to_hf_config,
)

COMMON = dict(vocab_size=96, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=48, num_experts_per_tok=2)
DEEPSEEK = dict(num_key_value_heads=4, moe_intermediate_size=24, n_routed_experts=8, n_shared_experts=1, n_group=4,
                topk_group=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8,
                qk_rope_head_dim=4, v_head_dim=8, routed_scaling_factor=2.5)
TINY = {  # (model_type, its own keys), the tiny models of tests/hf_models.py and variants
    "mixtral": ("mixtral", dict(num_local_experts=8)),
    "qwen2_moe": ("qwen2_moe", dict(num_experts=8, moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                    mlp_only_layers=[0])),
    "qwen2_moe-unshared": ("qwen2_moe", dict(num_experts=8, moe_intermediate_size=24, decoder_sparse_step=1)),
    "qwen3_moe": ("qwen3_moe", dict(num_experts=8, moe_intermediate_size=24, head_dim=16, norm_topk_prob=True,
                                    mlp_only_layers=[0, 1])),
    "olmoe": ("olmoe", dict(intermediate_size=24, num_experts=8)),
    "deepseek_v3": ("deepseek_v3", DEEPSEEK),
    "deepseek_v3-no-q-lora": ("deepseek_v3", dict(DEEPSEEK, q_lora_rank=None, first_k_dense_replace=0)),
}


@pytest.mark.parametrize("case", TINY)
def test_a_tiny_model_round_trips_through_its_config_json(case):
    model_type, own = TINY[case]
    arch, cfg = from_hf_config(dict(COMMON, model_type=model_type, **own))
    assert arch == model_type
    hf = json.loads(json.dumps(to_hf_config(arch, cfg, "float32")))  # as written to the folder
    assert hf["model_type"] == arch and hf["architectures"] == [FAMILIES[arch].hf_class]
    assert from_hf_config(hf) == (arch, cfg)
    assert infer_architecture(cfg) == arch


def test_the_registry_refuses_a_second_family_of_a_name_or_a_priority():
    assert set(ARCHITECTURES) == set(FAMILIES)
    taken = FAMILIES[ARCHITECTURES[0]]
    for clash in (dict(name=taken.name, priority=-1), dict(name="another", priority=taken.priority)):
        with pytest.raises(ValueError):
            register(type("Clash", (Family,), clash))
    assert set(ARCHITECTURES) == set(FAMILIES)


def test_a_gated_shared_expert_is_refused_where_the_family_has_no_gate():
    """DeepSeek-V3's shared experts have no gate: exporting one would write a tensor transformers drops."""
    _, cfg = from_hf_config(dict(COMMON, model_type="deepseek_v3", **DEEPSEEK))
    cfg.moe.shared_gate = True
    with pytest.raises(InteropError, match=r"^--arch=deepseek_v3: model\.moe\.shared_gate=True: deepseek_v3 has no gate"):
        to_hf_config("deepseek_v3", cfg, "float32")
