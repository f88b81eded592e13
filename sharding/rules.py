"""Logical axis names -> mesh axes, decided in one table apart from the model.

Model code names each array dimension with a logical name (``"batch"``, ``"experts"``,
``"expert_mlp"`` ...); this table maps the name to mesh axes. Mesh axes missing from the
current mesh are dropped, so the same model runs on any mesh, including none.
"""

from __future__ import annotations

from jax.sharding import PartitionSpec as P

from sharding.mesh import BATCH_AXES, EXPERT_AXIS, TENSOR_AXIS

# logical name -> mesh axis, tuple of mesh axes, or None (replicated)
DEFAULT_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "seq": None,
    "embed": None,
    "experts": EXPERT_AXIS,
    "expert_embed": None,
    "expert_mlp": TENSOR_AXIS,
    "router_in": None,
    "router_out": None,
}


def logical_to_spec(logical_axes, mesh=None, rules=None) -> P:
    """PartitionSpec for an array whose dimensions carry ``logical_axes``.

    Mesh axes that ``mesh`` lacks are dropped; with ``mesh=None`` every dimension is replicated.
    """
    rules = DEFAULT_RULES if rules is None else rules
    present = () if mesh is None else tuple(mesh.axis_names)
    out = []
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in rules:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        target = rules[name]
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        axes = tuple(a for a in axes if a in present)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)
