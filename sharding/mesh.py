"""Device meshes.

Switchyard's mesh axes, outermost first: ``data`` (pure data parallel), ``fsdp`` (data parallel
with sharded parameters), ``expert`` (experts, and also batch), ``tensor`` (hidden dimension).
A mesh may use any subset; absent axes behave as size 1. All axes use Explicit axis types.
"""

from __future__ import annotations

import math
import os

import jax
from jax.sharding import AxisType

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")  # the global batch is split over these, in this order
EXPERT_AXIS = "expert"
TENSOR_AXIS = "tensor"


def emulate_cpu_devices(n: int) -> None:
    """Ask XLA:CPU for ``n`` devices. Must run before JAX initialises its backend."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={n}")
    os.environ["XLA_FLAGS"] = " ".join(flags)


def resolve_axis_sizes(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fill one ``-1`` axis so that the product equals ``num_devices``; raise ValueError naming the axis."""
    unknown = [name for name, size in sizes.items() if size == -1]
    for name, size in sizes.items():
        if size != -1 and size < 1:
            raise ValueError(f"mesh.{name}={size}: axis sizes must be >= 1 or -1 (fill)")
    if len(unknown) > 1:
        raise ValueError(f"mesh.{unknown[1]}=-1: at most one mesh axis may be -1")
    known = math.prod(size for size in sizes.values() if size != -1)
    resolved = dict(sizes)
    if unknown:
        if num_devices % known:
            raise ValueError(f"mesh.{unknown[0]}=-1: {num_devices} devices are not divisible by {known}")
        resolved[unknown[0]] = num_devices // known
    elif known != num_devices:
        shape = ", ".join(f"{k}={v}" for k, v in sizes.items())
        raise ValueError(f"mesh: {shape} needs {known} devices, but {num_devices} are present")
    return resolved


def make_mesh(devices=None, **sizes: int) -> jax.sharding.Mesh:
    """A mesh with Explicit axis types, e.g. ``make_mesh(data=2, expert=4)``.

    Axes are ordered as in MESH_AXES whatever the keyword order; one size may be -1 (fill).
    """
    unknown = set(sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh.{sorted(unknown)[0]}: unknown mesh axis (known: {', '.join(MESH_AXES)})")
    devices = list(jax.devices() if devices is None else devices)
    names = tuple(a for a in MESH_AXES if a in sizes)
    resolved = resolve_axis_sizes({a: sizes[a] for a in names}, len(devices))
    shape = tuple(resolved[a] for a in names)
    return jax.make_mesh(shape, names, axis_types=(AxisType.Explicit,) * len(names), devices=devices)


def current_mesh():
    """The mesh set with ``jax.set_mesh``, or None when there is none."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def axis_size(mesh, name: str) -> int:
    """Size of a mesh axis, 1 if the mesh (or the axis) is absent."""
    if mesh is None or name not in mesh.axis_names:
        return 1
    return mesh.shape[name]


def batch_axes(mesh) -> tuple[str, ...]:
    """The batch axes present in ``mesh`` (outermost first)."""
    if mesh is None:
        return ()
    return tuple(a for a in BATCH_AXES if a in mesh.axis_names)
