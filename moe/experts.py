"""This device's experts as one computation: batched over slot buffers, grouped over rows, or
one expert for every row.

Shape letters: see ``moe/__init__.py``; here L experts on this device, C slots, R rows,
F expert hidden width (this device's part when split over the ``tensor`` mesh axis).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe.grouped_matmul import grouped_matmul

ACTIVATION_FNS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def glu(act, gate: jax.Array, up: jax.Array, limit: float = 0.0, alpha: float = 1.702) -> jax.Array:
    """``act(gate) * up``; with ``limit`` > 0 GPT-OSS's clamped SwiGLU: the gate clamped from above and
    the up projection on both sides at ``limit``, then ``(up + 1) * gate * sigmoid(alpha * gate)``."""
    if not limit:
        return act(gate) * up
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(alpha * gate))


def expert_of_rows(group_sizes_L: jax.Array, rows: int) -> jax.Array:
    """[R] the group (local expert) of each row of a grouped buffer; rows past the groups get the last."""
    ends_L = jnp.cumsum(group_sizes_L.astype(jnp.int32))
    return jnp.minimum(jnp.searchsorted(ends_L, jnp.arange(rows, dtype=jnp.int32), side="right"),
                       group_sizes_L.shape[0] - 1)


@dataclasses.dataclass(frozen=True)
class Experts:
    """y = act(x @ wg) * (x @ wi) @ wo (GLU, with ``wg``) or act(x @ wi) @ wo, per local expert
    (``glu``: the clamped SwiGLU with ``swiglu_limit``); with ``biases`` (bi [L,F], bg [L,F] or None,
    bo [L,D]) each projection adds its expert's bias.

    With ``tensor_axis`` the hidden dimension is split across that mesh axis and the partial
    outputs are summed with one psum (the output bias added once, after it).
    """

    wi_LDF: jax.Array
    wo_LFD: jax.Array
    wg_LDF: jax.Array | None
    activation: str
    tensor_axis: str | None = None
    grouped_impl: str = "auto"  # moe.grouped_matmul.GROUPED_MATMULS
    biases: tuple | None = None  # (bi_LF, bg_LF or None, bo_LD)
    swiglu_limit: float = 0.0
    swiglu_alpha: float = 1.702

    def batched(self, x_LCD: jax.Array) -> jax.Array:
        """[L, C, D] -> [L, C, D]: slot buffer l through expert l."""
        return self._ffn(lambda x, w: jnp.einsum("ecd,edh->ech", x, w), x_LCD, lambda b: b[:, None, :])

    def grouped(self, x_RD: jax.Array, group_sizes_L: jax.Array) -> jax.Array:
        """[R, D] -> [R, D]: rows [starts[l], starts[l] + sizes[l]) through expert l, by the
        grouped matmul ``grouped_impl`` (``moe.grouped_matmul``); rows past the last group are zero."""
        rows = x_RD.shape[0]
        matmul = lambda x, w: grouped_matmul(x, w, group_sizes_L, self.grouped_impl)  # noqa: E731
        if self.biases is None:
            return self._ffn(matmul, x_RD, None)
        expert_R = expert_of_rows(group_sizes_L, rows)  # once, for the three biases
        y_RD = self._ffn(matmul, x_RD, lambda b: b[expert_R])
        real_R1 = (jnp.arange(rows) < jnp.sum(group_sizes_L))[:, None]
        return jnp.where(real_R1, y_RD, jnp.zeros((), y_RD.dtype))

    def one(self, expert: jax.Array, plan) -> Experts:
        """Global expert ``expert`` alone, on every device: the device holding it gives its weights,
        the others zeros, and a psum over the expert axis (when split) sums them."""
        el = self.wi_LDF.shape[0]
        split = plan.expert_axis is not None and plan.expert_axis_size > 1
        local = expert - (jax.lax.axis_index(plan.expert_axis) * el if split else 0)
        mine, i = (local >= 0) & (local < el), jnp.clip(local, 0, el - 1)

        def pick(w):
            if w is None:
                return None
            w = jnp.where(mine, w[i], jnp.zeros((), w.dtype))[None]
            return jax.lax.psum(w, plan.expert_axis) if split else w

        biases = None if self.biases is None else tuple(pick(b) for b in self.biases)
        return dataclasses.replace(self, wi_LDF=pick(self.wi_LDF), wo_LFD=pick(self.wo_LFD), wg_LDF=pick(self.wg_LDF),
                                   biases=biases)

    def _ffn(self, matmul, x, per_row):
        """``per_row(b_L...)``: expert biases laid out to add to the rows of ``matmul``'s result."""
        act = ACTIVATION_FNS[self.activation]
        dtype = x.dtype
        bi, bg, bo = self.biases or (None, None, None)

        def project(x, w, b):
            y = matmul(x, w.astype(dtype))
            return y if b is None else y + per_row(b.astype(dtype))

        h = project(x, self.wi_LDF, bi)
        if self.wg_LDF is not None:
            h = glu(act, project(x, self.wg_LDF, bg), h, self.swiglu_limit, self.swiglu_alpha)
        else:
            h = act(h)
        y = matmul(h, self.wo_LFD.astype(dtype))
        if self.tensor_axis is not None:
            y = jax.lax.psum(y, self.tensor_axis)
        return y if bo is None else y + per_row(bo.astype(dtype))
