"""Logical axis names -> mesh axes, decided in one table apart from the model.

Model code names each array dimension with a logical name; a preset maps the names to mesh
axes. Mesh axes that the current mesh lacks, or that have size 1, are dropped, so the same
model runs on any mesh (or none). Parameters are stored in their *param* spec; before use
they are gathered to their *compute* spec, which is the param spec without ``fsdp`` (FSDP
shards storage only, the batch already runs over ``fsdp``).

Presets:
  dp      parameters replicated, experts too (the ``expert`` axis is then only a batch axis)
  ep      experts over ``expert``; dense parameters replicated            (default)
  fsdp    ep + dense and expert weights' model dimension over ``fsdp``
  ep+tp   ep + hidden, head and vocabulary dimensions over ``tensor``
  fsdp+tp fsdp + ep+tp: model dimension over ``fsdp``, hidden/heads/vocabulary over ``tensor``
"""

from __future__ import annotations

import contextlib
import contextvars

from jax.sharding import PartitionSpec as P

from sharding.mesh import BATCH_AXES, EXPERT_AXIS, TENSOR_AXIS

FSDP_AXIS = "fsdp"

Rules = dict[str, "str | tuple[str, ...] | None"]

_EP: Rules = {
    # activations
    "batch": BATCH_AXES,
    "seq": None,
    "act_embed": None,
    "act_heads": None,
    "act_kv_heads": None,
    "act_mlp": None,
    "act_vocab": None,
    # dense parameters
    "vocab": None,
    "embed": None,
    "heads": None,
    "kv_heads": None,  # key/value heads of grouped-query attention
    "head_dim": None,
    "latent": None,  # the low-rank query/key-value latents of multi-head latent attention
    "mlp": None,
    "norm": None,
    "layers": None,  # the stacked layer axis of scanned blocks (model.scan_layers): never split
    # MoE parameters
    "experts": EXPERT_AXIS,
    "expert_embed": None,
    "expert_mlp": None,
    "router_in": None,
    "router_out": None,
}

PRESETS: dict[str, Rules] = {
    "dp": {**_EP, "experts": None},
    "ep": _EP,
    "fsdp": {**_EP, "embed": FSDP_AXIS, "expert_embed": FSDP_AXIS},
    "ep+tp": {
        **_EP,
        "mlp": TENSOR_AXIS,
        "heads": TENSOR_AXIS,
        "kv_heads": TENSOR_AXIS,
        "vocab": TENSOR_AXIS,
        "expert_mlp": TENSOR_AXIS,
        "act_heads": TENSOR_AXIS,
        "act_kv_heads": TENSOR_AXIS,
        "act_mlp": TENSOR_AXIS,
        "act_vocab": TENSOR_AXIS,
    },
}
# both: the model dimension of every weight over fsdp (gathered per layer), hidden/heads/vocab over tensor
PRESETS["fsdp+tp"] = {**PRESETS["ep+tp"], "embed": FSDP_AXIS, "expert_embed": FSDP_AXIS}

_current: contextvars.ContextVar[str] = contextvars.ContextVar("switchyard_rules", default="ep")


@contextlib.contextmanager
def use_rules(preset: str):
    """Within the block, model code shards by ``preset``."""
    if preset not in PRESETS:
        raise ValueError(f"mesh.rules={preset!r}: unknown preset; choose one of {', '.join(PRESETS)}")
    token = _current.set(preset)
    try:
        yield
    finally:
        _current.reset(token)


@contextlib.contextmanager
def mesh_and_rules(mesh, preset: str):
    """``jax.set_mesh(mesh)`` and ``use_rules(preset)`` together: where model code is traced."""
    import jax

    with jax.set_mesh(mesh), use_rules(preset):
        yield


def logical_to_spec(logical_axes, mesh=None, rules: str | None = None, *, compute: bool = False) -> P:
    """PartitionSpec for an array whose dimensions carry ``logical_axes``.

    Mesh axes that ``mesh`` lacks or that have size 1 are dropped; with ``mesh=None`` every
    dimension is replicated. ``compute=True`` drops ``fsdp`` from parameter dimensions.
    """
    table = PRESETS[rules or _current.get()]
    sizes = {} if mesh is None else dict(mesh.shape)
    out = []
    for name in logical_axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"no sharding rule for logical axis {name!r}")
        target = table[name]
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        if compute and name != "batch":
            axes = tuple(a for a in axes if a != FSDP_AXIS)
        axes = tuple(a for a in axes if sizes.get(a, 1) > 1)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return P(*out)


def mesh_axis_of(logical_name: str, mesh, rules: str | None = None) -> str | None:
    """The single mesh axis a logical axis maps to on ``mesh`` (None if replicated)."""
    spec = logical_to_spec((logical_name,), mesh, rules, compute=True)[0]
    if spec is None or isinstance(spec, str):
        return spec
    raise ValueError(f"logical axis {logical_name!r} maps to several mesh axes {spec}")


def spread_spec(spec: P, shape: tuple[int, ...], mesh) -> P:
    """``spec`` with the mesh axes an array is replicated over added to one more of its dimensions,
    so that it is split over every device it can be (ZeRO-1: optimizer moments and their update).

    The free axes (those of ``mesh`` with size > 1 that ``spec`` does not use) go, as many as
    divide it, on the largest dimension that ``spec`` leaves unsplit; an array with no such
    dimension keeps ``spec``."""
    entries = list(tuple(spec)) + [None] * (len(shape) - len(tuple(spec)))
    used = {a for e in entries if e is not None for a in ((e,) if isinstance(e, str) else e)}
    free = [a for a in mesh.axis_names if a not in used and mesh.shape[a] > 1]
    for dim in sorted((i for i, e in enumerate(entries) if e is None), key=lambda i: -shape[i]):
        axes, size = [], 1
        for a in free:
            if shape[dim] % (size * mesh.shape[a]) == 0:
                axes.append(a)
                size *= mesh.shape[a]
        if axes:
            entries[dim] = axes[0] if len(axes) == 1 else tuple(axes)
            return P(*entries)
    return spec
