"""The model's rules live in ``TransformerConfig.check()`` (moe/config.py), each stated once: the model
refuses a bad field by its own name, and ``validate`` turns the same refusal into the one line
``config.model.<field>=<value>: <why>``. No JAX is started."""

import pytest

from moe.config import MLAConfig, MoEConfig, RopeScaling, TransformerConfig
from moe.fields import FieldError
from train.core.config import Config, validate
from train.errors import ConfigError

MODEL_RULES = [  # (fields of TransformerConfig, the one line validate prints)
    (dict(num_layers=0), "config.model.num_layers=0: must be >= 1"),
    (dict(vocab_size=-1), "config.model.vocab_size=-1: must be >= 0"),
    (dict(head_dim=-2), "config.model.head_dim=-2: must be >= 0"),
    (dict(d_model=130), "config.model.d_model=130: must be divisible by model.num_heads=4"),
    (dict(d_model=12, num_heads=4), "config.model.num_heads=4: head dimension d_model/num_heads must be even"),
    (dict(head_dim=7), "config.model.head_dim=7: must be even (RoPE)"),
    (dict(num_kv_heads=3), "config.model.num_kv_heads=3: must divide model.num_heads=4"),
    (dict(attention="gqa"), "config.model.attention='gqa': choose one of mha, mla"),
    (dict(qk_norm="layer"), "config.model.qk_norm='layer': choose one of none, head, proj"),
    (dict(attention="mla", qk_norm="head"), "config.model.attention='mla': mla has its own key/value layout"),
    (dict(norm_eps=0.0), "config.model.norm_eps=0.0: must be > 0"),
    (dict(first_dense_layers=9), "config.model.first_dense_layers=9: must be an integer in [0, model.num_layers=4]"),
    (dict(attention="mla", mla=MLAConfig(rope_head_dim=3)), "config.model.mla.rope_head_dim=3: must be even"),
    (dict(moe_every=-1), "config.model.moe_every=-1: must be >= 0"),
    (dict(activation="tanh"), "config.model.activation='tanh': choose one of gelu, silu, relu"),
    (dict(dtype="float16"), "config.model.dtype='float16': choose one of float32, bfloat16"),
    (dict(param_dtype="int8"), "config.model.param_dtype='int8': choose one of float32, bfloat16"),
    (dict(gated=1), "config.model.gated=1: must be True or False"),
    (dict(rope_theta=0.0), "config.model.rope_theta=0.0: must be > 0"),
    (dict(rope_scaling=RopeScaling(kind="ntk")), "config.model.rope_scaling.kind='ntk': choose one of none, yarn"),
    (dict(rope_scaling=RopeScaling(kind="yarn", factor=4.0)),
     "config.model.rope_scaling.original_max_positions=0: must be a positive integer"),
    (dict(rope_scaling=RopeScaling(kind="yarn", factor=0.5, original_max_positions=16)),
     "config.model.rope_scaling.factor=0.5: must be >= 1"),
    (dict(attention="mla", mla=MLAConfig(latent_norm_eps=-1.0)), "config.model.mla.latent_norm_eps=-1.0: must be >= 0"),
    (dict(attention="mla", attn_sinks=True), "config.model.attention='mla': mla has its own key/value layout"),
    (dict(sliding_window=-4), "config.model.sliding_window=-4: must be an integer >= 0"),
    (dict(full_attention_every=2), "config.model.full_attention_every=2: needs model.sliding_window > 0"),
    (dict(ffn_bias=1), "config.model.ffn_bias=1: must be True or False"),
    (dict(swiglu_limit=-1.0), "config.model.swiglu_limit=-1.0: must be >= 0"),
    (dict(swiglu_limit=7.0, activation="gelu"), "config.model.swiglu_limit=7.0: the clamped SwiGLU needs gated=True"),
    (dict(swiglu_alpha=0.0), "config.model.swiglu_alpha=0.0: must be > 0"),
    (dict(moe=MoEConfig(router="hash", router_bias=True)),
     "config.model.moe.router_bias=True: router='hash' has no learned scores to bias"),
    (dict(scan_layers="yes"), "config.model.scan_layers='yes': choose one of auto, on, off"),
    (dict(remat="some"), "config.model.remat='some': choose one of none, full"),
    (dict(moe=MoEConfig(router="nope")), "config.model.moe.router='nope': unknown router"),
    (dict(moe=MoEConfig(experts_per_token=2).with_router("gshard", threshold=0.0)),
     "config.model.moe.router_options.gshard.threshold=0.0: must be a number > 0"),
    (dict(moe=MoEConfig().with_router("stable", balance=0.5)),
     "config.model.moe.router_options.stable.balance=0.5: must be 0 (off) or a number >= 1"),
    (dict(moe=MoEConfig(experts_per_token=4).with_router("sigmoid", num_groups=4, topk_groups=1)),
     "config.model.moe.experts_per_token=4: more than the 2 experts of router_options.sigmoid.topk_groups=1 groups"),
    (dict(moe_every=0, moe=MoEConfig().with_router("thor", consistency=0.5)),
     "config.model.moe_every=0: moe.router='thor' asks for a consistency loss, which needs MoE blocks"),
    (dict(moe=MoEConfig(router="expert_choice")),
     "config.model.moe.router='expert_choice': routes each token by later tokens of its group (non-causal): "
     "a causal LM would see the future; set model.allow_non_causal_router=True"),
]


@pytest.mark.parametrize("fields,message", MODEL_RULES, ids=[m.split("=")[0][13:] for _, m in MODEL_RULES])
def test_each_model_rule_lives_in_the_model_config_and_reaches_validate_as_one_message(fields, message):
    with pytest.raises(FieldError) as own:
        TransformerConfig(**fields).check()
    assert f"config.model.{own.value.field}={own.value.value!r}: {own.value.why}".startswith(message)
    assert str(own.value).startswith("TransformerConfig.")
    cfg = Config()
    cfg.model = TransformerConfig(**fields)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_a_valid_model_passes_and_a_non_causal_one_passes_when_allowed():
    assert TransformerConfig().check() and TransformerConfig(attention="mla").check()
    allowed = TransformerConfig(moe=MoEConfig(router="expert_choice"), allow_non_causal_router=True)
    assert allowed.check() is allowed
