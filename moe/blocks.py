"""The pieces of a transformer block: RMSNorm, rotary embeddings, causal multi-head attention,
the dense FFN, and ``Block`` (pre-norm attention then a dense or MoE feed-forward network).

Shape letters: see ``moe/__init__.py`` (S query positions, P key positions, N heads, H head dim).
Activations in ``cfg.dtype``; norms, softmaxes, the router and the logits in float32. Every
parameter is created sharded by the logical-axis rules (sharding/rules.py) and gathered to its
compute sharding before use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.config import FFNConfig, TransformerConfig
from moe.experts import ACTIVATION_FNS
from moe.layer import MoEFeedForward
from moe.params import compute_value, sharded_param
from sharding.mesh import current_mesh
from sharding.rules import logical_to_spec


def einsum(eq: str, a: jax.Array, b: jax.Array, out_axes, preferred_element_type=None) -> jax.Array:
    """jnp.einsum whose result carries the compute sharding of ``out_axes`` (logical names);
    ``preferred_element_type=jnp.float32`` accumulates and returns float32 from bf16 inputs."""
    mesh = current_mesh()
    out_sharding = None if mesh is None else logical_to_spec(out_axes, mesh)
    return jnp.einsum(eq, a, b, out_sharding=out_sharding, preferred_element_type=preferred_element_type)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        self.scale = sharded_param(None, (dim,), ("norm",), 1.0, jnp.float32, init="ones")
        self.eps = eps

    def __call__(self, x_BSD: jax.Array) -> jax.Array:
        x32 = x_BSD.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (x32 * compute_value(self.scale, ("norm",))[None, None, :]).astype(x_BSD.dtype)


def rope(x_BSNH: jax.Array, positions_BS: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding, rotate-half form, computed in float32."""
    half = x_BSNH.shape[-1] // 2
    freq_H = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_BSH = positions_BS.astype(jnp.float32)[..., None] * freq_H[None, None, :]
    sin, cos = jnp.sin(angle_BSH)[:, :, None, :], jnp.cos(angle_BSH)[:, :, None, :]
    x1, x2 = jnp.split(x_BSNH.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BSNH.dtype)


class Attention(nnx.Module):
    IN_AXES = ("embed", "heads", "head_dim")
    OUT_AXES = ("heads", "head_dim", "embed")

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        d, n = cfg.d_model, cfg.num_heads
        h = d // n
        pdtype = jnp.dtype(cfg.param_dtype)
        self.wq = sharded_param(rngs.params(), (d, n, h), self.IN_AXES, d**-0.5, pdtype)
        self.wk = sharded_param(rngs.params(), (d, n, h), self.IN_AXES, d**-0.5, pdtype)
        self.wv = sharded_param(rngs.params(), (d, n, h), self.IN_AXES, d**-0.5, pdtype)
        self.wo = sharded_param(rngs.params(), (n, h, d), self.OUT_AXES, d**-0.5, pdtype)
        self.theta = cfg.rope_theta

    def project_qkv(self, x_BSD, positions_BS):
        dtype = x_BSD.dtype
        heads = ("batch", "seq", "act_heads", None)
        q = einsum("bsd,dnh->bsnh", x_BSD, compute_value(self.wq, self.IN_AXES).astype(dtype), heads)
        k = einsum("bsd,dnh->bsnh", x_BSD, compute_value(self.wk, self.IN_AXES).astype(dtype), heads)
        v = einsum("bsd,dnh->bsnh", x_BSD, compute_value(self.wv, self.IN_AXES).astype(dtype), heads)
        return rope(q, positions_BS, self.theta), rope(k, positions_BS, self.theta), v

    def attend(self, q_BSNH, k_BPNH, v_BPNH, mask_BSP):
        """softmax(q k^T / sqrt(H) + mask) v, output projection; float32 softmax."""
        scale = q_BSNH.shape[-1] ** -0.5
        logits = einsum("bsnh,bpnh->bnsp", q_BSNH, k_BPNH, ("batch", "act_heads", "seq", None), jnp.float32)
        logits = jnp.where(mask_BSP[:, None], logits * scale, -1e30)
        probs = jax.nn.softmax(logits, axis=-1).astype(v_BPNH.dtype)
        out_BSNH = einsum("bnsp,bpnh->bsnh", probs, v_BPNH, ("batch", "seq", "act_heads", None))
        wo = compute_value(self.wo, self.OUT_AXES).astype(out_BSNH.dtype)
        return einsum("bsnh,nhd->bsd", out_BSNH, wo, ("batch", "seq", "act_embed"))

    def __call__(self, x_BSD, positions_BS, cache=None):
        """Causal self-attention. With ``cache`` ({"k","v"}: [B,P,N,H]) the new keys and values
        are written at ``positions`` (one start index for the batch) and the queries attend to
        every cached position up to their own; returns (y, new cache or None)."""
        q, k, v = self.project_qkv(x_BSD, positions_BS)
        if cache is None:
            s = x_BSD.shape[1]
            mask_BSP = jnp.broadcast_to(jnp.tril(jnp.ones((s, s), bool)), (x_BSD.shape[0], s, s))
            return self.attend(q, k, v, mask_BSP), None
        start = positions_BS[0, 0]
        k_BPNH = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, start, 0, 0))
        v_BPNH = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, start, 0, 0))
        p = k_BPNH.shape[1]
        mask_BSP = jnp.arange(p)[None, None, :] <= positions_BS[:, :, None]
        return self.attend(q, k_BPNH, v_BPNH, mask_BSP), {"k": k_BPNH, "v": v_BPNH}


class DenseFFN(nnx.Module):
    IN_AXES = ("embed", "mlp")
    OUT_AXES = ("mlp", "embed")

    def __init__(self, cfg: FFNConfig, *, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.d_ff
        pdtype = jnp.dtype(cfg.param_dtype)
        self.wi = sharded_param(rngs.params(), (d, f), self.IN_AXES, d**-0.5, pdtype)
        self.wg = sharded_param(rngs.params(), (d, f), self.IN_AXES, d**-0.5, pdtype) if cfg.gated else None
        self.wo = sharded_param(rngs.params(), (f, d), self.OUT_AXES, f**-0.5, pdtype)
        self.act = ACTIVATION_FNS[cfg.activation]

    def __call__(self, x_BSD):
        dtype = x_BSD.dtype
        hidden = ("batch", "seq", "act_mlp")
        h_BSF = einsum("bsd,df->bsf", x_BSD, compute_value(self.wi, self.IN_AXES).astype(dtype), hidden)
        if self.wg is not None:
            g_BSF = einsum("bsd,df->bsf", x_BSD, compute_value(self.wg, self.IN_AXES).astype(dtype), hidden)
            h_BSF = self.act(g_BSF) * h_BSF
        else:
            h_BSF = self.act(h_BSF)
        wo = compute_value(self.wo, self.OUT_AXES).astype(dtype)
        return einsum("bsf,fd->bsd", h_BSF, wo, ("batch", "seq", "act_embed"))


class Block(nnx.Module):
    def __init__(self, cfg: TransformerConfig, index: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model)
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(cfg.d_model)
        self.is_moe = cfg.is_moe_block(index)
        if self.is_moe:  # its fixed evaluation draws are seeded by the block index: layers draw independently
            self.ffn = MoEFeedForward(cfg.moe, cfg.ffn(expert=True), rngs=rngs, layer=index, vocab_size=cfg.vocab_size)
        else:
            self.ffn = DenseFFN(cfg.ffn(), rngs=rngs)

    def __call__(self, x_BSD, positions_BS, token_ids_BS, cache=None, prev_token_ids_BS=None, layer=None):
        """``layer``: the block's index when it differs from the one it was built with (a scanned
        block is built once per pattern position; the scan passes each repeat's index)."""
        attn_BSD, new_cache = self.attn(self.attn_norm(x_BSD), positions_BS, cache)
        x_BSD = x_BSD + attn_BSD
        h_BSD = self.ffn_norm(x_BSD)
        if self.is_moe:  # cached decoding never drops: its steps hold one token per sequence
            y_BSD, aux = self.ffn(
                h_BSD, token_ids_BS, positions_BS=positions_BS, prev_token_ids_BS=prev_token_ids_BS,
                no_drops=cache is not None, layer=layer,
            )
        else:
            y_BSD, aux = self.ffn(h_BSD), None
        return x_BSD + y_BSD, aux, new_cache
