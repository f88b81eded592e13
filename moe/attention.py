"""Causal self-attention: multi-head with grouped keys/values (``Attention``: MHA, GQA, QK-norm,
biases) and DeepSeek's multi-head latent attention (``LatentAttention``: MLA).

Shape letters: see ``moe/__init__.py`` (S query positions, P key positions, N query heads,
H head dim); here also J key/value heads and Q = N / J query heads per key/value head (GQA),
Z a latent width (MLA's compressed query or key-value), O a rotary part of a head.

Both take ``(x, positions, cache)`` and return ``(y, new cache or None)``. A cache holds what a
later step needs for every position so far: keys and values [B,P,J,H] for ``Attention``, the
normalised key-value latent [B,P,Z] and the rotated shared key [B,P,O] for ``LatentAttention``
(the MLA cache: far smaller than per-head keys and values).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe.config import TransformerConfig
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
    """x / rms(x) * scale over the trailing ``len(shape)`` axes, in float32 (``shape`` = (D,) for a
    model-width norm; (N, H) normalises all heads of a projection together, as OLMoE's QK-norm)."""

    def __init__(self, dim: int | tuple[int, ...], eps: float = 1e-6, axes: tuple[str, ...] | None = None):
        shape = (dim,) if isinstance(dim, int) else tuple(dim)
        self.axes = axes or ("norm",) * len(shape)
        self.scale = sharded_param(None, shape, self.axes, 1.0, jnp.float32, init="ones", decay=False)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        n = self.scale.shape
        x32 = x.astype(jnp.float32)
        reduce = tuple(range(-len(n), 0))
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=reduce, keepdims=True) + self.eps)
        scale = compute_value(self.scale, self.axes)
        return (x32 * scale.reshape((1,) * (x.ndim - len(n)) + n)).astype(x.dtype)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's ``0.1 mscale ln(factor) + 1`` (1 for a factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn(dim: int, theta: float, scaling: tuple) -> tuple[np.ndarray, float]:
    """(the inverse frequencies [dim/2], float32; the factor on cos and sin) of YaRN for rotary
    dimension ``dim`` (``RopeScaling.key()``), computed as ``transformers`` computes them."""
    _, factor, original, beta_fast, beta_slow, attention_factor, mscale, mscale_all_dim, truncate = scaling
    if not attention_factor:
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))

    def correction_dim(rotations):  # the dimension that turns ``rotations`` times over the original context
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = np.float32(theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolate = 1 - np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv.astype(np.float32), float(attention_factor)


def rope(x_BSNH: jax.Array, positions_BS: jax.Array, theta: float, scaling: tuple | None = None) -> jax.Array:
    """Rotary embedding, rotate-half form (the first half of H pairs with the second), float32;
    ``scaling``: YaRN's settings (``RopeScaling.key()``), None for plain RoPE."""
    half = x_BSNH.shape[-1] // 2
    if scaling is None:
        freq_H, factor = theta ** (-jnp.arange(half, dtype=jnp.float32) / half), 1.0
    else:
        inv, factor = yarn(2 * half, theta, scaling)
        freq_H = jnp.asarray(inv)
    angle_BSH = positions_BS.astype(jnp.float32)[..., None] * freq_H[None, None, :]
    sin, cos = jnp.sin(angle_BSH)[:, :, None, :], jnp.cos(angle_BSH)[:, :, None, :]
    if factor != 1.0:
        sin, cos = sin * factor, cos * factor
    x1, x2 = jnp.split(x_BSNH.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x_BSNH.dtype)


def causal_mask(x_BSD: jax.Array, positions_BS: jax.Array, keys: int | None, window: int = 0) -> jax.Array:
    """[B,S,P] True where query s may see key p: the lower triangle without a cache, else every
    cached position up to the query's own; with ``window`` only the last ``window`` of those (the
    query's own position and the window - 1 before it)."""
    def visible(q, p):
        return (p <= q) & (p > q - window) if window else p <= q

    if keys is None:
        s = x_BSD.shape[1]
        return jnp.broadcast_to(visible(jnp.arange(s)[:, None], jnp.arange(s)[None, :]), (x_BSD.shape[0], s, s))
    return visible(positions_BS[:, :, None], jnp.arange(keys)[None, None, :])


def write_cache(cache_BP: jax.Array, new_BS: jax.Array, positions_BS: jax.Array) -> jax.Array:
    """``new`` written into the cache at the batch's start position (axis 1)."""
    start = (0, jnp.min(positions_BS)) + (0,) * (cache_BP.ndim - 2)
    new_BS = new_BS.astype(cache_BP.dtype)
    if current_mesh() is not None:  # the update takes the cache's sharding (the batch split over the mesh or not)
        new_BS = jax.sharding.reshard(new_BS, jax.typeof(cache_BP).sharding.spec)
    return jax.lax.dynamic_update_slice(cache_BP, new_BS, start)


def softmax_with_sink(logits, sink):
    """softmax over the last axis with one more logit ``sink`` (broadcast to the rows; None: plain
    softmax) in the denominator only: the row's weights sum to less than 1 by the sink's share."""
    if sink is None:
        return jax.nn.softmax(logits, axis=-1)
    top = jnp.maximum(jnp.max(logits, axis=-1, keepdims=True), sink)
    e = jnp.exp(logits - top)
    return e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - top))


def attend(q_BSNH, k_BPJH, v_BPJH, mask_BSP, scale: float, sinks_N=None) -> jax.Array:
    """softmax(q k^T * scale + mask) v per head, float32 softmax: [B,S,N,H_v]. With J < N key/value
    heads, query head n reads key/value head n // (N / J) (grouped-query attention). ``sinks_N``:
    each head's sink logit (float32), in its softmax's denominator (attention sinks)."""
    n, j = q_BSNH.shape[2], k_BPJH.shape[2]
    if n == j:
        logits = einsum("bsnh,bpnh->bnsp", q_BSNH, k_BPJH, ("batch", "act_heads", "seq", None), jnp.float32)
        logits = jnp.where(mask_BSP[:, None], logits * scale, -1e30)
        sinks = None if sinks_N is None else sinks_N[None, :, None, None]
        probs = softmax_with_sink(logits, sinks).astype(v_BPJH.dtype)
        return einsum("bnsp,bpnh->bsnh", probs, v_BPJH, ("batch", "seq", "act_heads", None))
    b, s, _, h = q_BSNH.shape
    q_BSJQH = q_BSNH.reshape(b, s, j, n // j, h)
    logits = einsum("bsjqh,bpjh->bjqsp", q_BSJQH, k_BPJH, ("batch", "act_kv_heads", None, "seq", None), jnp.float32)
    logits = jnp.where(mask_BSP[:, None, None], logits * scale, -1e30)
    sinks = None if sinks_N is None else sinks_N.reshape(j, n // j)[None, :, :, None, None]
    probs = softmax_with_sink(logits, sinks).astype(v_BPJH.dtype)
    out = einsum("bjqsp,bpjh->bsjqh", probs, v_BPJH, ("batch", "seq", "act_kv_heads", None, None))
    return out.reshape(b, s, n, v_BPJH.shape[-1])


class Attention(nnx.Module):
    """Causal self-attention with RoPE: N query heads, J = ``num_kv_heads`` key/value heads (GQA when
    J < N), optional QK-norm (``qk_norm``: per head or over the whole projection), q/k/v biases and an
    output bias, attention sinks (``sinks`` [N]) and a sliding window (``window`` > 0: a query sees
    the ``window`` positions ending at its own; the KV cache is read through the same window)."""

    IN_AXES = ("embed", "heads", "head_dim")
    KV_AXES = ("embed", "kv_heads", "head_dim")
    OUT_AXES = ("heads", "head_dim", "embed")

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, window: int = 0):
        d, n, j, h = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_width
        pdtype = jnp.dtype(cfg.param_dtype)
        kv_axes = self.IN_AXES if j == n else self.KV_AXES
        self.wq = sharded_param(rngs.params(), (d, n, h), self.IN_AXES, d**-0.5, pdtype)
        self.kv_axes = kv_axes  # decided here: a forward pass reads no metadata
        self.wk = sharded_param(rngs.params(), (d, j, h), kv_axes, d**-0.5, pdtype)
        self.wv = sharded_param(rngs.params(), (d, j, h), kv_axes, d**-0.5, pdtype)
        self.wo = sharded_param(rngs.params(), (n, h, d), self.OUT_AXES, (n * h) ** -0.5, pdtype)
        self.bias_axes = (self.IN_AXES[1:], kv_axes[1:])
        if cfg.attn_bias:
            bias = functools.partial(sharded_param, None, std=0.0, dtype=pdtype, init="zeros", decay=False)
            self.bq = bias((n, h), self.bias_axes[0])
            self.bk = bias((j, h), self.bias_axes[1])
            self.bv = bias((j, h), self.bias_axes[1])
        else:
            self.bq = self.bk = self.bv = nnx.data(None)
        self.bo = (sharded_param(None, (d,), ("embed",), 0.0, pdtype, init="zeros", decay=False) if cfg.attn_out_bias
                   else nnx.data(None))
        # the sink logits stay float32 (they join the float32 softmax)
        self.sinks = (sharded_param(None, (n,), ("heads",), 0.0, jnp.float32, init="zeros", decay=False)
                      if cfg.attn_sinks else nnx.data(None))
        self.window = window
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(h, cfg.norm_eps)
            self.k_norm = RMSNorm(h, cfg.norm_eps)
        elif cfg.qk_norm == "proj":
            self.q_norm = RMSNorm((n, h), cfg.norm_eps, self.bias_axes[0])
            self.k_norm = RMSNorm((j, h), cfg.norm_eps, self.bias_axes[1])
        else:
            self.q_norm = self.k_norm = nnx.data(None)
        self.theta, self.scaling = cfg.rope_theta, cfg.rope_scaling.key()
        self.kv_act = ("batch", "seq", "act_heads" if j == n else "act_kv_heads", None)

    def _project(self, x_BSD, w, axes, bias, bias_axes, out_axes):
        dtype = x_BSD.dtype
        y = einsum("bsd,dnh->bsnh", x_BSD, compute_value(w, axes).astype(dtype), out_axes)
        if bias is not None:
            y = y + compute_value(bias, bias_axes).astype(dtype)[None, None]
        return y

    def project_qkv(self, x_BSD, positions_BS):
        kv_axes = self.kv_axes
        q = self._project(x_BSD, self.wq, self.IN_AXES, self.bq, self.bias_axes[0], ("batch", "seq", "act_heads", None))
        k = self._project(x_BSD, self.wk, kv_axes, self.bk, self.bias_axes[1], self.kv_act)
        v = self._project(x_BSD, self.wv, kv_axes, self.bv, self.bias_axes[1], self.kv_act)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return rope(q, positions_BS, self.theta, self.scaling), rope(k, positions_BS, self.theta, self.scaling), v

    def output(self, out_BSNH):
        wo = compute_value(self.wo, self.OUT_AXES).astype(out_BSNH.dtype)
        y_BSD = einsum("bsnh,nhd->bsd", out_BSNH, wo, ("batch", "seq", "act_embed"))
        return y_BSD if self.bo is None else y_BSD + compute_value(self.bo, ("embed",)).astype(y_BSD.dtype)[None, None]

    def _attend(self, q, k, v, mask):
        sinks = None if self.sinks is None else compute_value(self.sinks, ("heads",))
        return self.output(attend(q, k, v, mask, q.shape[-1] ** -0.5, sinks))

    def __call__(self, x_BSD, positions_BS, cache=None):
        """Causal self-attention. With ``cache`` ({"k","v"}: [B,P,J,H]) the new keys and values
        are written at ``positions`` (one start index for the batch) and the queries attend to
        every cached position up to their own; returns (y, new cache or None)."""
        q, k, v = self.project_qkv(x_BSD, positions_BS)
        if cache is None:
            return self._attend(q, k, v, causal_mask(x_BSD, positions_BS, None, self.window)), None
        k_BPJH, v_BPJH = write_cache(cache["k"], k, positions_BS), write_cache(cache["v"], v, positions_BS)
        mask = causal_mask(x_BSD, positions_BS, k_BPJH.shape[1], self.window)
        return self._attend(q, k_BPJH, v_BPJH, mask), {"k": k_BPJH, "v": v_BPJH}

    @staticmethod
    def empty_cache(cfg: TransformerConfig, batch: int, max_len: int, lead=()) -> dict:
        shape = lead + (batch, max_len, cfg.kv_heads, cfg.head_width)
        dtype = jnp.dtype(cfg.dtype)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class LatentAttention(nnx.Module):
    """DeepSeek-V2/V3 multi-head latent attention (``model.mla``).

    Queries: x -> [Z_q] -> RMSNorm -> [N, H_nope + O] (or x -> [N, H_nope + O] directly when
    ``q_lora_rank`` is 0). Keys and values: x -> latent [Z_kv] (RMSNorm) and one rotary key [O]
    shared by every head; latent -> per head [H_nope + H_v], split into the key's position-free part
    and the value. Each head's key is (its nope part, the shared rotary key). Scores scaled by
    (H_nope + O)^-1/2. The cache keeps the latent and the rotated key, and rebuilds keys and values
    from the latent at each step."""

    def __init__(self, cfg: TransformerConfig, *, rngs: nnx.Rngs, window: int = 0):
        m = cfg.mla  # (``window``: always 0, model.sliding_window is for mha)
        d, n = cfg.d_model, cfg.num_heads
        pdtype = jnp.dtype(cfg.param_dtype)
        qk = m.nope_head_dim + m.rope_head_dim
        eps = m.latent_norm_eps or cfg.norm_eps
        if m.q_lora_rank:
            self.wq_a = sharded_param(rngs.params(), (d, m.q_lora_rank), ("embed", "latent"), d**-0.5, pdtype)
            self.q_norm = RMSNorm(m.q_lora_rank, eps)
            self.wq = sharded_param(rngs.params(), (m.q_lora_rank, n, qk), ("latent", "heads", "head_dim"),
                                    m.q_lora_rank**-0.5, pdtype)
        else:
            self.wq_a = self.q_norm = nnx.data(None)
            self.wq = sharded_param(rngs.params(), (d, n, qk), ("embed", "heads", "head_dim"), d**-0.5, pdtype)
        self.wkv_a = sharded_param(rngs.params(), (d, m.kv_lora_rank + m.rope_head_dim), ("embed", "latent"),
                                   d**-0.5, pdtype)
        self.kv_norm = RMSNorm(m.kv_lora_rank, eps)
        self.wkv_b = sharded_param(rngs.params(), (m.kv_lora_rank, n, m.nope_head_dim + m.v_head_dim),
                                   ("latent", "heads", "head_dim"), m.kv_lora_rank**-0.5, pdtype)
        self.wo = sharded_param(rngs.params(), (n, m.v_head_dim, d), ("heads", "head_dim", "embed"),
                                (n * m.v_head_dim) ** -0.5, pdtype)
        self.nope, self.rope_dim, self.kv_rank = m.nope_head_dim, m.rope_head_dim, m.kv_lora_rank
        self.theta, self.scaling = cfg.rope_theta, cfg.rope_scaling.key()

    def _queries(self, x_BSD, positions_BS):
        dtype = x_BSD.dtype
        heads = ("batch", "seq", "act_heads", None)
        if self.wq_a is not None:
            lat = einsum("bsd,dz->bsz", x_BSD, compute_value(self.wq_a, ("embed", "latent")).astype(dtype),
                         ("batch", "seq", None))
            q = einsum("bsz,znh->bsnh", self.q_norm(lat), compute_value(self.wq, ("latent", "heads", "head_dim"))
                       .astype(dtype), heads)
        else:
            q = einsum("bsd,dnh->bsnh", x_BSD, compute_value(self.wq, ("embed", "heads", "head_dim")).astype(dtype),
                       heads)
        q_nope, q_rot = q[..., : self.nope], q[..., self.nope:]
        return jnp.concatenate([q_nope, rope(q_rot, positions_BS, self.theta, self.scaling)], axis=-1)

    def _latent(self, x_BSD, positions_BS):
        """(normalised latent [B,S,Z], rotated shared key [B,S,O])."""
        ckv = einsum("bsd,dz->bsz", x_BSD, compute_value(self.wkv_a, ("embed", "latent")).astype(x_BSD.dtype),
                     ("batch", "seq", None))
        latent, k_rot = ckv[..., : self.kv_rank], ckv[..., self.kv_rank:]
        return self.kv_norm(latent), rope(k_rot[:, :, None, :], positions_BS, self.theta, self.scaling)[:, :, 0, :]

    def __call__(self, x_BSD, positions_BS, cache=None):
        q_BSNH = self._queries(x_BSD, positions_BS)
        latent_BPZ, k_rot_BPO = self._latent(x_BSD, positions_BS)
        new_cache, keys = None, None
        if cache is not None:
            latent_BPZ = write_cache(cache["latent"], latent_BPZ, positions_BS)
            k_rot_BPO = write_cache(cache["k_rot"], k_rot_BPO, positions_BS)
            new_cache, keys = {"latent": latent_BPZ, "k_rot": k_rot_BPO}, latent_BPZ.shape[1]
        dtype = x_BSD.dtype
        kv = einsum("bpz,znh->bpnh", latent_BPZ.astype(dtype),
                    compute_value(self.wkv_b, ("latent", "heads", "head_dim")).astype(dtype),
                    ("batch", "seq", "act_heads", None))
        k_nope, v_BPNH = kv[..., : self.nope], kv[..., self.nope:]
        k_rot = jnp.broadcast_to(k_rot_BPO[:, :, None, :].astype(dtype), k_nope.shape[:3] + (self.rope_dim,))
        if current_mesh() is not None:  # the shared key joins every head where the heads are (split over tensor)
            k_rot = jax.sharding.reshard(k_rot, jax.typeof(k_nope).sharding.spec)
        k_BPNH = jnp.concatenate([k_nope, k_rot], axis=-1)
        scale = (self.nope + self.rope_dim) ** -0.5
        if self.scaling is not None and self.scaling[7]:  # YaRN's mscale_all_dim, on every dimension's score
            scale *= yarn_mscale(self.scaling[1], self.scaling[7]) ** 2
        out = attend(q_BSNH, k_BPNH, v_BPNH, causal_mask(x_BSD, positions_BS, keys), scale)
        wo = compute_value(self.wo, ("heads", "head_dim", "embed")).astype(out.dtype)
        return einsum("bsnh,nhd->bsd", out, wo, ("batch", "seq", "act_embed")), new_cache

    @staticmethod
    def empty_cache(cfg: TransformerConfig, batch: int, max_len: int, lead=()) -> dict:
        m, dtype = cfg.mla, jnp.dtype(cfg.dtype)
        return {"latent": jnp.zeros(lead + (batch, max_len, m.kv_lora_rank), dtype),
                "k_rot": jnp.zeros(lead + (batch, max_len, m.rope_head_dim), dtype)}


ATTENTION = {"mha": Attention, "mla": LatentAttention}
