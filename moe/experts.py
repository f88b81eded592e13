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


@dataclasses.dataclass(frozen=True)
class Experts:
    """y = act(x @ wg) * (x @ wi) @ wo (GLU, with ``wg``) or act(x @ wi) @ wo, per local expert.

    With ``tensor_axis`` the hidden dimension is split across that mesh axis and the partial
    outputs are summed with one psum.
    """

    wi_LDF: jax.Array
    wo_LFD: jax.Array
    wg_LDF: jax.Array | None
    activation: str
    tensor_axis: str | None = None
    grouped_impl: str = "auto"  # moe.grouped_matmul.GROUPED_MATMULS

    def batched(self, x_LCD: jax.Array) -> jax.Array:
        """[L, C, D] -> [L, C, D]: slot buffer l through expert l."""
        return self._ffn(lambda x, w: jnp.einsum("ecd,edh->ech", x, w), x_LCD)

    def grouped(self, x_RD: jax.Array, group_sizes_L: jax.Array) -> jax.Array:
        """[R, D] -> [R, D]: rows [starts[l], starts[l] + sizes[l]) through expert l, by the
        grouped matmul ``grouped_impl`` (``moe.grouped_matmul``); rows past the last group are zero."""
        return self._ffn(lambda x, w: grouped_matmul(x, w, group_sizes_L, self.grouped_impl), x_RD)

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

        return dataclasses.replace(self, wi_LDF=pick(self.wi_LDF), wo_LFD=pick(self.wo_LFD), wg_LDF=pick(self.wg_LDF))

    def _ffn(self, matmul, x):
        act = ACTIVATION_FNS[self.activation]
        dtype = x.dtype
        h = matmul(x, self.wi_LDF.astype(dtype))
        h = act(matmul(x, self.wg_LDF.astype(dtype))) * h if self.wg_LDF is not None else act(h)
        y = matmul(h, self.wo_LFD.astype(dtype))
        if self.tensor_axis is not None:
            y = jax.lax.psum(y, self.tensor_axis)
        return y
