"""Where each variable of a checkpoint lives, in every layout Switchyard has written: the one place
that maps old paths to today's.

Checkpoints hold nested dicts keyed by the model's variable paths (``train.core.checkpoint``).
Layouts:
  * ``v1`` (before routers were their own modules): an MoE layer held its router's variables
    itself, ``ffn/router_w``, ``ffn/expert_bias``, ``ffn/hash_table`` and the RNG stream ``ffn/rngs``.
  * ``v2`` (today): they live in the layer's router, ``ffn/router/w``, ``ffn/router/bias``,
    ``ffn/router/table``, ``ffn/router/rngs``.
And, in any version since scanning, the blocks are stored either way (``model.scan_layers``):
  * unrolled: ``blocks/{i}/...`` for every block i;
  * scanned: ``head/{i}/...`` for the first F blocks (the dense first layers, rounded up to a whole
    pattern; absent when F = 0), ``stack/pattern/{j}/...`` with a leading [R] axis for blocks
    F + r*P + j (P blocks in the pattern, R repeats), then ``blocks/{t}/...`` for block F + R*P + t
    (the blocks after the last repeat).
A restore builds its target in today's layout; ``legacy`` finds the layout whose paths match what
a checkpoint stores and converts both ways, so a run written scanned evaluates, samples and
resumes unrolled, and the reverse.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

# v1 name in an MoE layer -> v2 name in that layer's router
V1_ROUTER = {"router_w": "w", "expert_bias": "bias", "hash_table": "table", "rngs": "rngs"}


def _map_layers(tree, fn):
    """``fn`` applied to every block's FFN node (key ``ffn``), wherever it sits (parameters,
    their optimizer moments, model state)."""
    if not isinstance(tree, dict):
        return tree
    return {k: _map_layers(fn(v) if k == "ffn" and isinstance(v, dict) else v, fn) for k, v in tree.items()}


def _v2_to_v1(layer: dict) -> dict:
    out = {k: v for k, v in layer.items() if k != "router"}
    for old, new in V1_ROUTER.items():
        if new in layer.get("router", {}):
            out[old] = layer["router"][new]
    return out


def _v1_to_v2(layer: dict) -> dict:
    out = {k: v for k, v in layer.items() if k not in V1_ROUTER}
    router = {new: layer[old] for old, new in V1_ROUTER.items() if old in layer}
    if router:
        out["router"] = router
    return out


def to_v1(tree: dict) -> dict:
    return _map_layers(tree, _v2_to_v1)


def to_v2(tree: dict) -> dict:
    return _map_layers(tree, _v1_to_v2)


def paths(tree, prefix: str = "") -> set[str]:
    """The '/'-joined key paths of the leaves of a nested dict."""
    out: set[str] = set()
    for key, value in tree.items():
        if hasattr(value, "items"):
            out |= paths(value, f"{prefix}{key}/")
        else:
            out.add(f"{prefix}{key}")
    return out


# ---------------------------------------------------------------- scanned <-> unrolled blocks
def _is_model(node) -> bool:
    return isinstance(node, dict) and ("blocks" in node or "stack" in node)


def _map_models(tree, fn):
    """``fn`` applied to every model node (a dict holding ``blocks`` or ``stack``), wherever it
    sits: parameters, their optimizer moments, model state."""
    if _is_model(tree):
        return fn(tree)
    if not isinstance(tree, dict):
        return tree
    return {k: _map_models(v, fn) for k, v in tree.items()}


def _respec(x, spec: PartitionSpec):
    sharding = getattr(x, "sharding", None)
    return NamedSharding(sharding.mesh, spec) if isinstance(sharding, NamedSharding) else sharding


def _take(x, r: int):
    """Repeat ``r`` of a stacked leaf (an array, or an abstract one with its sharding)."""
    if isinstance(x, jax.ShapeDtypeStruct):
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else None
        sharding = None if spec is None else _respec(x, PartitionSpec(*tuple(spec)[1:]))
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sharding)
    return x[r]


def _stack(xs: list):
    """Leaves of the repeats of one block stacked on a leading axis."""
    x = xs[0]
    if isinstance(x, jax.ShapeDtypeStruct):
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else None
        sharding = None if spec is None else _respec(x, PartitionSpec(None, *tuple(spec)))
        return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=sharding)
    return jnp.stack(xs)


def unroll(tree: dict, period: int, offset: int = 0) -> dict:
    """Scanned model nodes -> unrolled ones (``blocks/{i}`` for every block); ``offset``: F."""

    def one(node):
        if "stack" not in node:
            return node
        pattern = node["stack"]["pattern"]
        repeats = jax.tree.leaves(pattern)[0].shape[0]
        blocks = dict(node.get("head", {}))
        for j, sub in pattern.items():
            for r in range(repeats):
                blocks[str(offset + r * period + int(j))] = jax.tree.map(lambda x, r=r: _take(x, r), sub)
        for t, sub in node.get("blocks", {}).items():
            blocks[str(offset + repeats * period + int(t))] = sub
        out = {k: v for k, v in node.items() if k not in ("head", "stack", "blocks")}
        return {**out, "blocks": dict(sorted(blocks.items(), key=lambda kv: int(kv[0])))}

    return _map_models(tree, one)


def scan(tree: dict, period: int, repeats: int, offset: int = 0) -> dict:
    """Unrolled model nodes -> scanned ones: blocks before ``offset`` as ``head/{i}``, blocks
    offset + r*P + j stacked as ``stack/pattern/{j}``, the rest as ``blocks/{t}``."""

    def one(node):
        if "stack" in node:
            return node
        head, scanned, tail = {}, {}, {}
        for i, sub in node.get("blocks", {}).items():
            i = int(i)
            if i < offset:
                head[str(i)] = sub
            elif i < offset + repeats * period:
                scanned.setdefault((i - offset) % period, {})[(i - offset) // period] = sub
            else:
                tail[str(i - offset - repeats * period)] = sub
        pattern = {}
        for j, subs in sorted(scanned.items()):
            if sorted(subs) != list(range(repeats)):
                raise ValueError(f"blocks {[offset + r * period + j for r in range(repeats)]} are not all stored")
            pattern[str(j)] = jax.tree.map(lambda *xs: _stack(list(xs)), *[subs[r] for r in range(repeats)])
        out = {k: v for k, v in node.items() if k != "blocks"}
        if head:
            out["head"] = head
        if pattern:
            out["stack"] = {"pattern": pattern}
        if tail:
            out["blocks"] = tail
        return out

    return _map_models(tree, one)


def stack_shape(tree: dict) -> tuple[int, int, int] | None:
    """(pattern positions P seen, repeats R, head blocks F) of the first scanned model node in
    ``tree``, or None. In a parameter tree every block is present, so P is the pattern's length and
    F the number of blocks before the stack."""
    found = []

    def one(node):
        if "stack" in node and not found:
            pattern = node["stack"]["pattern"]
            found.append((len(pattern), jax.tree.leaves(pattern)[0].shape[0], len(node.get("head", {}))))
        return node

    _map_models(tree, one)
    return found[0] if found else None


def _placed_like(tree, like):
    """``tree``'s arrays placed with the shardings of ``like``'s (the restore target's)."""
    return jax.tree.map(
        lambda x, ref: jax.device_put(x, ref.sharding) if getattr(ref, "sharding", None) is not None else x, tree, like
    )


def legacy(target: dict, stored_paths: set[str] | None, stored_stack: tuple[int, int, int] | None = None,
           target_stack: tuple[int, int, int] | None = None) -> tuple[dict, Callable[[dict], dict]]:
    """(the target in the layout the checkpoint stores, a function bringing what is read back to
    today's layout). Today's layout when the paths match, or when none matches (the restore then
    names the difference). ``stored_stack``: (P, R) of the checkpoint's scanned blocks (from its
    parameters' shapes), needed to read a scanned checkpoint into an unrolled model; ``target_stack``
    likewise for the target (default: from ``target``, exact for parameter trees)."""
    if stored_paths is None or paths(target) == stored_paths:
        return target, lambda tree: tree
    old = to_v1(target)
    if paths(old) == stored_paths:
        return old, to_v2
    ours = stack_shape(target) if target_stack is None else target_stack
    if ours is not None and stack_shape(target) is not None:  # scanned today, stored unrolled
        period, repeats, offset = ours
        old = unroll(target, period, offset)
        if paths(old) == stored_paths:
            return old, lambda tree: _placed_like(scan(tree, period, repeats, offset), target)
    elif stored_stack is not None:  # unrolled today, stored scanned
        period, repeats, offset = stored_stack
        old = scan(target, period, repeats, offset)
        if paths(old) == stored_paths:
            return old, lambda tree: _placed_like(unroll(tree, period, offset), target)
    return target, lambda tree: tree
