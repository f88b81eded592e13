"""Decoder-only transformer language model with dense or MoE feed-forward blocks.

Shape letters: see ``moe/__init__.py`` (S query positions, P key positions, N heads, H head dim).

Pre-norm blocks: x + Attn(RMSNorm(x)), then x + FFN(RMSNorm(x)) where FFN is an
``MoEFeedForward`` in every ``moe_every``-th block and a dense GLU/MLP elsewhere. Causal
multi-head attention with rotary position embeddings (RoPE). Activations in ``cfg.dtype``;
norms, softmaxes, the router and the logits in float32. Every parameter is created sharded by
the logical-axis rules (sharding/rules.py) and gathered to its compute sharding before use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.config import FFNConfig, TransformerConfig
from moe.experts import ACTIVATION_FNS
from moe.layer import MoEFeedForward
from moe.params import compute_value, sharded_param
from moe.routers.hashing import NO_PREVIOUS_TOKEN
from sharding.mesh import current_mesh
from sharding.rules import logical_to_spec

NON_CAUSAL_HINT = (
    "this causal language model would see the future; set allow_non_causal_router=True to train it anyway "
    "for a routing study"
)
LOSS_KEYS = ("aux_loss", "z_loss", "router_loss")  # summed over MoE layers: each layer's coefficient applies in full
STAT_KEYS = ("dropped_fraction", "router_entropy", "expert_load")  # averaged over MoE layers
AUX_KEYS = LOSS_KEYS + STAT_KEYS


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

    def __call__(self, x_BSD, positions_BS, token_ids_BS, cache=None, prev_token_ids_BS=None):
        attn_BSD, new_cache = self.attn(self.attn_norm(x_BSD), positions_BS, cache)
        x_BSD = x_BSD + attn_BSD
        h_BSD = self.ffn_norm(x_BSD)
        if self.is_moe:  # cached decoding never drops: its steps hold one token per sequence
            y_BSD, aux = self.ffn(
                h_BSD, token_ids_BS, positions_BS=positions_BS, prev_token_ids_BS=prev_token_ids_BS,
                no_drops=cache is not None,
            )
        else:
            y_BSD, aux = self.ffn(h_BSD), None
        return x_BSD + y_BSD, aux, new_cache


class Transformer(nnx.Module):
    """``logits_BSV, aux = model(tokens_BS)``; ``aux`` sums the MoE layers' router losses and
    averages their statistics (``combine_aux``)."""

    EMBED_AXES = ("vocab", "embed")

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs):
        if cfg.vocab_size < 1:
            raise ValueError(f"TransformerConfig.vocab_size={cfg.vocab_size}: must be set (>= 1) to build a model")
        if cfg.moe_every:
            cfg.moe.check()
        if cfg.non_causal_routing and not cfg.allow_non_causal_router:
            raise ValueError(f"TransformerConfig{cfg.non_causal_message()[len('model'):]}; {NON_CAUSAL_HINT}")
        self.cfg = cfg
        pdtype = jnp.dtype(cfg.param_dtype)
        self.embed = sharded_param(rngs.params(), (cfg.vocab_size, cfg.d_model), self.EMBED_AXES, 1.0, pdtype)
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.d_model)
        self.unembed = (
            None
            if cfg.tie_embeddings
            else sharded_param(rngs.params(), (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.d_model**-0.5, pdtype)
        )

    @property
    def num_moe_layers(self) -> int:
        return sum(1 for b in self.blocks if b.is_moe)

    def moe_layers(self) -> list[tuple[int, MoEFeedForward]]:
        return [(i, b.ffn) for i, b in enumerate(self.blocks) if b.is_moe]

    @property
    def wants_token_counts(self) -> bool:
        """Whether a router learns from the training split's token counts before training (``fit_routers``)."""
        return any(layer.router.wants_token_counts for _, layer in self.moe_layers())

    def fit_routers(self, token_counts_V) -> None:
        """Before training: routers that learn from token counts (balanced_hash's table) do."""
        for _, layer in self.moe_layers():
            layer.router.fit(token_counts_V)

    def embed_tokens(self, tokens_BS):
        table = compute_value(self.embed, (None, None))  # gathered whole for the lookup
        mesh = current_mesh()
        spec = None if mesh is None else logical_to_spec(("batch", "seq", "act_embed"), mesh)
        x_BSD = table.at[tokens_BS].get(out_sharding=spec)
        return x_BSD.astype(jnp.dtype(self.cfg.dtype))

    def logits(self, x_BSD):
        """float32 logits; the matmul takes the activation dtype with float32 accumulation."""
        x_BSD = self.final_norm(x_BSD)
        dtype, out_axes = x_BSD.dtype, ("batch", "seq", "act_vocab")
        if self.unembed is None:
            table = compute_value(self.embed, self.EMBED_AXES).astype(dtype)
            return einsum("bsd,vd->bsv", x_BSD, table, out_axes, jnp.float32) * self.cfg.d_model**-0.5
        unembed = compute_value(self.unembed, ("embed", "vocab")).astype(dtype)
        return einsum("bsd,dv->bsv", x_BSD, unembed, out_axes, jnp.float32)

    def __call__(self, tokens_BS, positions_BS=None):
        """Training / scoring forward pass: ``logits_BSV, aux``."""
        logits_BSV, aux, _ = self.forward(tokens_BS, positions_BS)
        return logits_BSV, aux

    def update_router_state(self, aux: dict) -> None:
        """Once per training step: each MoE layer's router state learns from that layer's load
        over the whole step (``aux["per_layer"]``; see ``MoEFeedForward.update_router_state``)."""
        for i, layer in self.moe_layers():
            layer.update_router_state(aux["per_layer"][f"layer{i}"]["expert_load"])

    def decode(self, tokens_BS, positions_BS, cache):
        """Incremental decoding with a KV cache (see ``init_cache``): ``logits_BSV, new_cache``.

        Each call costs the new positions only; the prompt can go in one call (prefill). The MoE
        layers never drop while decoding, so decoding equals the full forward pass without drops
        (it differs from ``moe-eval`` only where ``eval_capacity_factor`` makes that drop).
        """
        logits_BSV, _, cache = self.forward(tokens_BS, positions_BS, cache)
        return logits_BSV, cache

    def init_cache(self, batch: int, max_len: int) -> dict:
        """Empty keys/values [B, max_len, N, H] for every block, in the activation dtype, and the
        token ids seen so far [B, max_len] (the bigram router reads the previous one)."""
        n = self.cfg.num_heads
        shape = (batch, max_len, n, self.cfg.d_model // n)
        dtype = jnp.dtype(self.cfg.dtype)
        blocks = [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in self.blocks]
        return {"blocks": blocks, "tokens": jnp.zeros((batch, max_len), jnp.int32)}

    def forward(self, tokens_BS, positions_BS=None, cache=None):
        if positions_BS is None:
            b, s = tokens_BS.shape
            positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            mesh = current_mesh()
            if mesh is not None:
                positions_BS = jax.sharding.reshard(positions_BS, logical_to_spec(("batch", "seq"), mesh))
        x_BSD = self.embed_tokens(tokens_BS)
        prev_BS, new_cache = None, None
        if cache is not None:  # the previous token of each new position comes from the cache
            seen_BT = jax.lax.dynamic_update_slice(cache["tokens"], tokens_BS.astype(jnp.int32), (0, positions_BS[0, 0]))
            prev_BS = jnp.take_along_axis(seen_BT, jnp.maximum(positions_BS - 1, 0), axis=1)
            prev_BS = jnp.where(positions_BS > 0, prev_BS, NO_PREVIOUS_TOKEN)
            new_cache = {"blocks": [], "tokens": seen_BT}
        auxes = {}
        for i, block in enumerate(self.blocks):
            block_cache = None if cache is None else cache["blocks"][i]
            x_BSD, aux, block_cache = block(x_BSD, positions_BS, tokens_BS, block_cache, prev_BS)
            if cache is not None:
                new_cache["blocks"].append(block_cache)
            if aux is not None:
                auxes[i] = aux
        return self.logits(x_BSD), combine_aux(auxes, self.cfg.moe.num_experts), new_cache


def load_imbalance(load_E: jax.Array) -> jax.Array:
    """max / mean of the per-expert load (1 = perfectly balanced, E = everything on one expert)."""
    return jnp.max(load_E) * load_E.shape[-1] / jnp.maximum(jnp.sum(load_E), 1e-9)


def combine_aux(auxes: dict[int, dict], num_experts: int) -> dict:
    """The model's MoE statistics from each MoE layer's (zeros for a dense model).

    Router losses (``aux_loss``, ``z_loss``, ``router_loss``) are summed over the layers, as in
    Switch Transformer and GShard: each layer adds its own ``aux_loss_coef * E * sum f_i P_i``,
    so a coefficient means the same at any depth. The statistics (``dropped_fraction``,
    ``router_entropy``, ``expert_load``) are averaged; ``load_imbalance`` is the mean over layers
    of each layer's; ``per_layer[f"layer{i}"]`` holds, for the MoE block with index i, that
    layer's aux_loss, z_loss, expert_load, dropped_fraction, router_entropy and load_imbalance."""
    zero = jnp.zeros((), jnp.float32)
    if not auxes:
        out = {k: (jnp.zeros((num_experts,), jnp.float32) if k == "expert_load" else zero) for k in AUX_KEYS}
        return {**out, "load_imbalance": zero, "per_layer": {}}
    layers = list(auxes.values())
    out = {k: sum(a[k] for a in layers) for k in LOSS_KEYS}
    out.update({k: sum(a[k] for a in layers) / len(layers) for k in STAT_KEYS})
    per_layer = {
        f"layer{i}": {
            "aux_loss": a["aux_loss"],
            "z_loss": a["z_loss"],
            "expert_load": a["expert_load"],
            "dropped_fraction": a["dropped_fraction"],
            "router_entropy": a["router_entropy"],
            "load_imbalance": load_imbalance(a["expert_load"]),
        }
        for i, a in auxes.items()
    }
    out["load_imbalance"] = sum(v["load_imbalance"] for v in per_layer.values()) / len(per_layer)
    return {**out, "per_layer": per_layer}
