"""Routers, one module per family, each behind one small interface (``base.Router``).

``ROUTERS`` maps a router's name (``MoEConfig.router``) to its class. Every module in this
package registers its classes with ``@register`` and is imported here, so a new router is one
new module (plus its tests): nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil

from moe.routers.base import RouteInput, Router, Routing

ROUTERS: dict[str, type[Router]] = {}


def register(cls: type[Router]) -> type[Router]:
    if cls.name in ROUTERS:
        raise ValueError(f"router {cls.name!r} is registered twice")
    ROUTERS[cls.name] = cls
    return cls


def make_router(cfg, d_model: int, *, key, rngs, eval_seed: int = 0, vocab_size: int = 0) -> Router:
    """The router ``cfg.router`` names, its parameters from ``key`` (see ``base.Router``)."""
    return ROUTERS[cfg.router](cfg, d_model, key=key, rngs=rngs, eval_seed=eval_seed, vocab_size=vocab_size)


for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["ROUTERS", "RouteInput", "Router", "Routing", "make_router", "register"]
