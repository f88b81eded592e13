"""Parameters born sharded, and gathered to their compute sharding before use.

Every weight is created already split by the logical-axis rules of ``sharding/rules.py`` under
the current mesh (no unsharded copy ever exists); its logical axis names are kept as metadata,
and so is whether weight decay applies to it (``decays``). Metadata is read when the model is
built and by the trainer, never in a forward pass: inside ``jax.lax.scan`` a stacked variable's
metadata still names the ``layers`` axis that the body's slice no longer has.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sharding.mesh import current_mesh
from sharding.rules import logical_to_spec


class RouterState(nnx.Variable):
    """Model state a router keeps that gradients never train (frozen router weights, loss-free
    biases, hash tables): saved in checkpoints with the model, never seen by the optimizer."""


def sharded_param(
    key, shape, logical_axes, std: float, dtype, mesh=None, init: str = "normal", kind: type = nnx.Param,
    decay: bool = True,
) -> nnx.Variable:
    """A normal(0, std) (or ``init="ones"`` / ``"zeros"``, drawing nothing) variable created directly in its sharding
    (an ``nnx.Param`` unless ``kind`` says otherwise). ``decay=False``: never weight-decayed (norm
    scales, biases, lookup tables of routing decisions); see ``decays``."""
    mesh = current_mesh() if mesh is None else mesh
    spec = None if mesh is None else logical_to_spec(logical_axes, mesh)
    if init in ("ones", "zeros"):
        fill = jnp.ones if init == "ones" else jnp.zeros
        value = fill(shape, dtype, device=None if spec is None else jax.sharding.NamedSharding(mesh, spec))
    else:
        value = jax.random.normal(key, shape, dtype, out_sharding=spec) * jnp.asarray(std, dtype)
    meta = {} if spec is None else {"out_sharding": tuple(spec)}
    if not decay:
        meta["weight_decay"] = False
    return kind(value, logical_axes=tuple(logical_axes), **meta)


def decays(var: nnx.Variable) -> bool:
    """Whether weight decay applies to ``var``: a matrix or tensor by its logical axes (a stacked
    ``layers`` axis does not count, so scanned and unrolled models decay the same parameters) that
    was not created with ``decay=False``."""
    meta = var.get_metadata()
    if not meta.get("weight_decay", True):
        return False
    axes = meta.get("logical_axes")
    return var[...].ndim >= 2 if axes is None else sum(a != "layers" for a in axes) >= 2


def compute_value(param: nnx.Variable, logical_axes) -> jax.Array:
    """The variable's value gathered to its compute sharding (a no-op unless it is FSDP-sharded).

    ``logical_axes`` must name every axis of the value: a spec of another length is refused (JAX
    0.11 raises on it, 0.10 silently trimmed it, which re-split a scanned layer's weights)."""
    value = param[...]
    if len(logical_axes) != value.ndim:
        raise ValueError(f"compute_value: logical axes {tuple(logical_axes)} for a value of shape {value.shape}")
    mesh = current_mesh()
    if mesh is None:
        return value
    spec = logical_to_spec(logical_axes, mesh, compute=True)
    if jax.typeof(value).sharding.spec != spec:
        value = jax.sharding.reshard(value, spec)
    return value


def spec_of(logical_axes):
    """The PartitionSpec of ``logical_axes`` on the current mesh (None without a mesh)."""
    mesh = current_mesh()
    return None if mesh is None else logical_to_spec(logical_axes, mesh)
