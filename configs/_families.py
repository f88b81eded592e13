"""Small from-scratch versions of today's MoE families, sharing the laptop run's data and schedule
(``configs/<family>_tiny.py`` each pick one; a leading underscore: a helper, not a config). Each exports to its Hugging Face architecture
(``moe-export``) after training.

  mixtral      GQA, 8 experts top-2, renormalised gates
  qwen2_moe    GQA with q/k/v biases, 16 fine-grained experts top-4 (gates not renormalised), a shared
               expert behind a sigmoid gate, the first block dense
  qwen3_moe    GQA with per-head QK-norm, 16 fine-grained experts top-4, renormalised
  olmoe        QK-norm over the whole projection, 16 experts top-4 (gates not renormalised)
  deepseek_v3  multi-head latent attention, 16 experts top-4 by sigmoid scores in 4 groups (2 chosen),
               routed scaling, loss-free bias, one shared expert, the first block dense
  gpt_oss      GQA with q/k/v/o biases and attention sinks, windowed (32 positions) and full attention
               blocks alternating, 16 experts top-4 with biases and the clamped SwiGLU, a router with a bias
"""

from train.core.config import Config


def tiny(family: str) -> Config:
    cfg = Config()
    m = cfg.model
    m.num_layers, m.d_model, m.num_heads, m.d_ff, m.moe_every = 4, 128, 4, 512, 1
    m.tie_embeddings = False
    m.moe.capacity_factor = 1.5
    if family != "deepseek_v3":
        m.num_kv_heads = 2
    if family == "mixtral":
        m.moe.num_experts, m.moe.experts_per_token, m.moe.expert_d_ff = 8, 2, 512
        m.moe.norm_topk_prob = "on"
    elif family in ("qwen2_moe", "qwen3_moe", "olmoe"):
        m.moe.num_experts, m.moe.experts_per_token, m.moe.expert_d_ff = 16, 4, 128
        m.moe.norm_topk_prob = "on" if family == "qwen3_moe" else "off"
        if family == "qwen2_moe":
            m.attn_bias, m.first_dense_layers = True, 1
            m.moe.shared_d_ff, m.moe.shared_gate = 256, True
        elif family == "qwen3_moe":
            m.qk_norm, m.head_dim = "head", 32
        else:
            m.qk_norm, m.moe.expert_d_ff = "proj", 512
            m.moe.experts_per_token = 2
    elif family == "deepseek_v3":
        m.attention = "mla"
        m.mla.q_lora_rank, m.mla.kv_lora_rank = 64, 64
        m.mla.nope_head_dim, m.mla.rope_head_dim, m.mla.v_head_dim = 32, 16, 32
        m.first_dense_layers = 1
        m.moe.router, m.moe.num_experts, m.moe.experts_per_token, m.moe.expert_d_ff = "sigmoid", 16, 4, 128
        routing = m.moe.router_options.sigmoid
        routing.num_groups, routing.topk_groups, routing.routed_scaling = 4, 2, 2.5
        m.moe.shared_d_ff, m.moe.aux_loss_coef = 128, 1e-4
    elif family == "gpt_oss":
        m.d_ff, m.moe.num_experts, m.moe.experts_per_token, m.moe.expert_d_ff = 128, 16, 4, 128
        m.moe.norm_topk_prob, m.moe.router_bias = "on", True
        m.attn_bias = m.attn_out_bias = m.attn_sinks = m.ffn_bias = True
        m.sliding_window, m.full_attention_every = 32, 2
        m.swiglu_limit = 7.0
    else:
        raise ValueError(f"unknown family {family!r}")
    cfg.mesh.data, cfg.mesh.expert = 2, 4
    cfg.train.steps, cfg.train.batch_size, cfg.train.seq_len = 300, 16, 128
    cfg.data.max_bytes = 8_000_000
    cfg.checkpoint.every_steps, cfg.eval_every_steps = 100, 100
    return cfg
