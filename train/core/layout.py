"""Where each variable of a checkpoint lives, in every layout Switchyard has written: the one place
that maps old paths to today's.

Checkpoints hold nested dicts keyed by the model's variable paths (``train.core.checkpoint``).
Layouts:
  * ``v1`` (before routers were their own modules): an MoE layer held its router's variables
    itself, ``ffn/router_w``, ``ffn/expert_bias``, ``ffn/hash_table`` and the RNG stream ``ffn/rngs``.
  * ``v2`` (today): they live in the layer's router, ``ffn/router/w``, ``ffn/router/bias``,
    ``ffn/router/table``, ``ffn/router/rngs``.
A restore builds its target in today's layout; ``legacy`` finds the layout whose paths match what
a checkpoint stores and converts both ways.
"""

from __future__ import annotations

from typing import Callable

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


def legacy(target: dict, stored_paths: set[str] | None) -> tuple[dict, Callable[[dict], dict]]:
    """(the target in the layout the checkpoint stores, a function bringing what is read back to
    today's layout). Today's layout when the paths match, or when none matches (the restore then
    names the difference)."""
    if stored_paths is None or paths(target) == stored_paths:
        return target, lambda tree: tree
    old = to_v1(target)
    if paths(old) == stored_paths:
        return old, to_v2
    return target, lambda tree: tree
