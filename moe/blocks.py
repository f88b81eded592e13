"""The pieces of a transformer block: the dense FFN, and ``Block`` (pre-norm attention, then a
dense or MoE feed-forward network, with optional shared experts). Attention, RMSNorm and rotary
embeddings live in ``moe.attention``.

Shape letters: see ``moe/__init__.py`` (S query positions, P key positions, N heads, H head dim).
Activations in ``cfg.dtype``; norms, softmaxes, the router and the logits in float32. Every
parameter is created sharded by the logical-axis rules (sharding/rules.py) and gathered to its
compute sharding before use.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.attention import ATTENTION, Attention, RMSNorm, einsum, rope
from moe.config import FFNConfig, TransformerConfig
from moe.experts import ACTIVATION_FNS, glu
from moe.layer import MoEFeedForward
from moe.params import compute_value, sharded_param

__all__ = ["Attention", "Block", "DenseFFN", "RMSNorm", "einsum", "rope"]


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
        self.limit, self.alpha = cfg.swiglu_limit, cfg.swiglu_alpha
        if cfg.ffn_bias:
            bias = lambda n, axis: sharded_param(None, (n,), (axis,), 0.0, pdtype, init="zeros", decay=False)  # noqa: E731
            self.bi, self.bo = bias(f, "mlp"), bias(d, "embed")
            self.bg = bias(f, "mlp") if cfg.gated else nnx.data(None)
        else:
            self.bi = self.bg = self.bo = nnx.data(None)

    def _project(self, eq, x, w, axes, b, b_axes, out_axes):
        y = einsum(eq, x, compute_value(w, axes).astype(x.dtype), out_axes)
        return y if b is None else y + compute_value(b, b_axes).astype(x.dtype)[None, None]

    def __call__(self, x_BSD):
        hidden = ("batch", "seq", "act_mlp")
        h_BSF = self._project("bsd,df->bsf", x_BSD, self.wi, self.IN_AXES, self.bi, ("mlp",), hidden)
        if self.wg is not None:
            g_BSF = self._project("bsd,df->bsf", x_BSD, self.wg, self.IN_AXES, self.bg, ("mlp",), hidden)
            h_BSF = glu(self.act, g_BSF, h_BSF, self.limit, self.alpha)
        else:
            h_BSF = self.act(h_BSF)
        return self._project("bsf,fd->bsd", h_BSF, self.wo, self.OUT_AXES, self.bo, ("embed",), ("batch", "seq", "act_embed"))


class Block(nnx.Module):
    """x + Attn(RMSNorm(x)), then x + FFN(RMSNorm(x)). In an MoE block the FFN is the routed
    experts plus, with ``moe.shared_d_ff``, a dense FFN every token passes through (the shared
    experts), its output scaled by sigmoid(x . w) with ``moe.shared_gate``."""

    def __init__(self, cfg: TransformerConfig, index: int, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = ATTENTION[cfg.attention](cfg, rngs=rngs, window=cfg.attention_window(index))
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.is_moe_block(index)
        self.shared = self.shared_gate = nnx.data(None)
        if self.is_moe:  # its fixed evaluation draws are seeded by the block index: layers draw independently
            self.ffn = MoEFeedForward(cfg.moe, cfg.ffn(expert=True), rngs=rngs, layer=index, vocab_size=cfg.vocab_size)
            if cfg.moe.shared_d_ff:
                self.shared = DenseFFN(cfg.ffn(shared=True), rngs=rngs)
                if cfg.moe.shared_gate:
                    self.shared_gate = sharded_param(rngs.params(), (cfg.d_model,), ("embed",), cfg.d_model**-0.5,
                                                     jnp.dtype(cfg.param_dtype))
        else:
            self.ffn = DenseFFN(cfg.ffn(), rngs=rngs)

    def __call__(self, x_BSD, positions_BS, token_ids_BS, cache=None, prev_token_ids_BS=None, layer=None):
        """``layer``: the block's index when it differs from the one it was built with (a scanned
        block is built once per pattern position; the scan passes each repeat's index)."""
        attn_BSD, new_cache = self.attn(self.attn_norm(x_BSD), positions_BS, cache)
        x_BSD = x_BSD + attn_BSD
        h_BSD = self.ffn_norm(x_BSD)
        if self.is_moe:  # cached decoding never drops: its steps hold one token per sequence
            y_BSD, stats = self.ffn(
                h_BSD, token_ids_BS, positions_BS=positions_BS, prev_token_ids_BS=prev_token_ids_BS,
                no_drops=cache is not None, layer=layer,
            )
            if self.shared is not None:
                y_BSD = y_BSD + self.shared_output(h_BSD)
        else:
            y_BSD, stats = self.ffn(h_BSD), None
        return x_BSD + y_BSD, stats, new_cache

    def shared_output(self, h_BSD):
        shared_BSD = self.shared(h_BSD)
        if self.shared_gate is None:
            return shared_BSD
        w_D = compute_value(self.shared_gate, ("embed",)).astype(jnp.float32)
        gate_BS1 = jax.nn.sigmoid(jnp.einsum("bsd,d->bs", h_BSD.astype(jnp.float32), w_D))[..., None]
        return (gate_BS1 * shared_BSD.astype(jnp.float32)).astype(shared_BSD.dtype)
