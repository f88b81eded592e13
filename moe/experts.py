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
    act = ACTIVATION_FNS[activation]
    dtype = x_ECD.dtype
    h_ECH = jnp.einsum("ecd,edh->ech", x_ECD, wi_EDH.astype(dtype))
    if wg_EDH is not None:
        h_ECH = act(jnp.einsum("ecd,edh->ech", x_ECD, wg_EDH.astype(dtype))) * h_ECH
    else:
        h_ECH = act(h_ECH)
    y_ECD = jnp.einsum("ech,ehd->ecd", h_ECH, wo_EHD.astype(dtype))
    if tensor_axis is not None:
        y_ECD = jax.lax.psum(y_ECD, tensor_axis)
    return y_ECD
