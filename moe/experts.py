"""The expert FFNs as one batched computation over [experts, slots, d].

Shape letters: E experts (local to this device inside shard_map), C slots, D model width,
H expert hidden width (local: split over the ``tensor`` mesh axis when it is present).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ACTIVATION_FNS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "relu": jax.nn.relu,
}


def expert_ffn(x_ECD, wi_EDH, wo_EHD, wg_EDH=None, *, activation: str, tensor_axis: str | None = None):
    """y[e] = act(x[e] @ wg[e]) * (x[e] @ wi[e]) @ wo[e]   (GLU, when ``wg`` is given)
    or y[e] = act(x[e] @ wi[e]) @ wo[e]                    (plain MLP).

    With ``tensor_axis`` the hidden dimension is split across that mesh axis and the partial
    outputs are summed with one psum.
    """
    return _ffn(lambda x, w: jnp.einsum("ecd,edh->ech", x, w), x_ECD, wi_EDH, wo_EHD, wg_EDH, activation, tensor_axis)


def grouped_expert_ffn(
    x_RD, group_sizes_E, wi_EDH, wo_EHD, wg_EDH=None, *, activation: str, tensor_axis: str | None = None
):
    """The same FFN over rows grouped by expert: rows [starts[e], starts[e] + sizes[e]) use expert
    e's weights (``jax.lax.ragged_dot``, a grouped GEMM on GPU/TPU); rows past the last group
    are not used by the caller.
    """
    return _ffn(
        lambda x, w: jax.lax.ragged_dot(x, w, group_sizes_E), x_RD, wi_EDH, wo_EHD, wg_EDH, activation, tensor_axis
    )


def _ffn(matmul, x, wi, wo, wg, activation, tensor_axis):
    act = ACTIVATION_FNS[activation]
    dtype = x.dtype
    h = matmul(x, wi.astype(dtype))
    h = act(matmul(x, wg.astype(dtype))) * h if wg is not None else act(h)
    y = matmul(h, wo.astype(dtype))
    if tensor_axis is not None:
        y = jax.lax.psum(y, tensor_axis)
    return y
