"""Routers, one module per family, each behind one small interface (``base.Router``).

``ROUTERS`` maps a router's name (``MoEConfig.router``) to its class. Every module in this
package registers its classes with ``@register`` and is imported here, so a new router is one
new module (plus its tests): nothing else names it. ``RouterOptions`` (``MoEConfig.router_options``)
is built from the registry: one section per router that declares ``Options``.
"""

from __future__ import annotations

import dataclasses
import importlib
import pkgutil

from moe.fields import StrictFields

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


def _check_sections(self):
    for f in dataclasses.fields(self):
        self._check_part(f.name, getattr(self, f.name))
    return self


RouterOptions = dataclasses.make_dataclass(
    "RouterOptions",
    [(name, cls.Options, dataclasses.field(default_factory=cls.Options))
     for name, cls in sorted(ROUTERS.items()) if cls.Options is not None],
    bases=(StrictFields,),
    namespace={"check": _check_sections,
               "__doc__": "Each router's own settings, a section per router name (only ``MoEConfig.router``'s is used)."},
)
RouterOptions.__module__ = __name__  # (make_dataclass's own ``module=`` needs Python 3.12)


def _formerly() -> dict[str, tuple[str, ...]]:
    out: dict[str, tuple[str, ...]] = {}
    for f in dataclasses.fields(RouterOptions):
        for option in dataclasses.fields(f.type):
            if "formerly" in option.metadata:
                old = option.metadata["formerly"]
                out[old] = out.get(old, ()) + (f"router_options.{f.name}.{option.name}",)
    return out


# A flat ``MoEConfig`` field of configs saved before routers owned their options -> the options that
# took it over (a seed shared by the hash routers goes to each of them), relative to ``MoEConfig``.
FORMERLY: dict[str, tuple[str, ...]] = _formerly()

__all__ = ["FORMERLY", "ROUTERS", "RouteInput", "Router", "RouterOptions", "Routing", "make_router", "register"]
