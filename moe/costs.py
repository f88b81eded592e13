"""What a model costs: parameter counts (total, active per token) and training FLOPs per token.

From the config alone (abstract shapes; nothing is allocated).
"""

from __future__ import annotations

import math

import jax
from flax import nnx

from moe.config import TransformerConfig


def param_counts(cfg: TransformerConfig) -> dict[str, int]:
    """Total and active (per token) parameter counts, and the experts' share of the total."""
    from moe.transformer import abstract_model

    abstract = abstract_model(cfg)
    total = expert = 0
    params = nnx.state(abstract, nnx.Param)
    for var in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        n = math.prod(var.shape)
        total += n
        if "experts" in var.get_metadata().get("logical_axes", ()):  # expert weights [(R,) E, ., .]
            expert += n
    e, k = cfg.moe.num_experts, cfg.moe.experts_per_token
    active = total - (expert * (e - k) // e if expert else 0)
    return {"total": total, "active": active, "expert": expert}


def attention_shape(cfg: TransformerConfig) -> tuple[int, int]:
    """(projection parameters of one attention layer, width of its scores and values per token:
    heads x (query-key dim + value dim) / 2), for GQA, head_dim and MLA alike."""
    d, n = cfg.d_model, cfg.num_heads
    if cfg.attention == "mla":
        c = cfg.mla
        qk = c.nope_head_dim + c.rope_head_dim
        q = d * c.q_lora_rank + c.q_lora_rank * n * qk if c.q_lora_rank else d * n * qk
        params = q + d * (c.kv_lora_rank + c.rope_head_dim) + c.kv_lora_rank * n * (c.nope_head_dim + c.v_head_dim)
        return params + n * c.v_head_dim * d, n * (qk + c.v_head_dim) // 2
    h = cfg.head_width
    return 2 * d * n * h + 2 * d * cfg.kv_heads * h, n * h


def flops_per_token(cfg: TransformerConfig, seq_len: int) -> float:
    """Training FLOPs per token of ``cfg`` at ``seq_len`` (``transformer_flops_per_token``)."""
    m = cfg.moe
    attention_params, attention_width = attention_shape(cfg)
    return transformer_flops_per_token(
        num_layers=cfg.num_layers, d_model=cfg.d_model, num_heads=cfg.num_heads, seq_len=seq_len,
        vocab_size=cfg.vocab_size, d_ff=cfg.d_ff, moe_layers=cfg.num_moe_layers, expert_d_ff=m.expert_d_ff or cfg.d_ff,
        experts_per_token=m.experts_per_token, gated=cfg.gated, num_experts=m.num_experts,
        attention_params=attention_params, attention_width=attention_width, shared_d_ff=m.shared_d_ff,
    )


def transformer_flops_per_token(
    *,
    num_layers: int,
    d_model: int,
    num_heads: int,
    seq_len: int,
    vocab_size: int,
    d_ff: int,
    moe_layers: int,
    expert_d_ff: int,
    experts_per_token: int,
    gated: bool,
    num_experts: int,
    attention_params: int | None = None,
    attention_width: int | None = None,
    shared_d_ff: int = 0,
) -> float:
    """Training FLOPs per token (forward + backward) counting only the parameters a token uses.

    With L layers, M of them MoE, d = d_model, S = seq_len, V = vocab, g = 3 if gated else 2
    (matrices per FFN), k = experts_per_token, E = num_experts, a matmul with m parameters costs
    2m FLOPs per token forward and the backward pass twice the forward::

        active = L * 4 d^2                      # q, k, v, o projections
               + (L - M) * g * d * d_ff         # dense FFN blocks
               + M * (k * g * d * expert_d_ff   # the k experts a token visits
                      + d * E)                  # router
               + d * V                          # output projection (counted even when tied)
        attention = L * 2 * S * d               # QK^T and AV forward FLOPs, causal (S/2 keys on average)
        flops = 3 * (2 * active + attention)

    The attention term is PaLM's ``12 L S d`` training cost halved for the causal mask. Embedding
    lookups, norms, softmax, RoPE, the capacity slots left empty and dispatch traffic are not
    counted. ``num_heads`` does not enter (heads x head_dim = d). Other attention shapes (GQA, a
    head width other than d / heads, MLA) give their own ``attention_params`` per layer (instead of
    4 d^2) and ``attention_width`` (instead of d); shared experts add ``g * d * shared_d_ff`` per MoE layer.
    """
    if not 0 <= moe_layers <= num_layers:
        raise ValueError(f"moe_layers={moe_layers}: must be in [0, num_layers={num_layers}]")
    if d_model % num_heads:
        raise ValueError(f"d_model={d_model}: not divisible by num_heads={num_heads}")
    d, g = d_model, 3 if gated else 2
    attention_params = 4 * d * d if attention_params is None else attention_params
    attention_width = d if attention_width is None else attention_width
    active = (
        num_layers * attention_params
        + (num_layers - moe_layers) * g * d * d_ff
        + moe_layers * (experts_per_token * g * d * expert_d_ff + d * num_experts + g * d * shared_d_ff)
        + d * vocab_size
    )
    attention = num_layers * 2 * seq_len * attention_width
    return float(3 * (2 * active + attention))
