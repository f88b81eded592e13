"""The Hugging Face architectures Switchyard reads and writes, one module per family, each a class
(``base.Family``) registered by its ``model_type``: its ``config.json`` <-> a ``TransformerConfig``,
and which of its tensors holds each Switchyard variable.

Supported (``model_type``): mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v3, gpt_oss. A setting
Switchyard does not compute the same way (a family's sliding windows where it declares them off, RoPE
scaling other than YaRN, tied embeddings, clipped q/k/v...) is refused with ``InteropError`` naming the
``config.json`` field, before anything is written.

Tensor layouts: a Hugging Face ``Linear`` stores [out, in]; Switchyard stores [in, (heads, head
dim | out)], experts stacked on a leading axis [E, ...]. DeepSeek's rotary parts are stored in
interleaved pairs (``rope_interleave``): their rows are reordered, evens then odds, into the
rotate-half layout Switchyard computes (the dot products are unchanged), and back on export.
GPT-OSS keeps each layer's experts in one tensor, [E, ...], the gate and up projections interleaved
in ``gate_up_proj``: two Switchyard variables read from it (``Table.joined``) and the exporter joins
them back.

``FAMILIES`` maps a ``model_type`` to its family. Every module in this package registers its class
with ``@register`` and is imported here, so a new family is one new module (plus its tests):
nothing else names it.
"""

from __future__ import annotations

import importlib
import pkgutil

from moe.config import TransformerConfig
from train.interop.families.base import Family, InteropError, Tensor

FAMILIES: dict[str, Family] = {}


def register(cls: type[Family]) -> type[Family]:
    if cls.name in FAMILIES:
        raise ValueError(f"family {cls.name!r} is registered twice")
    if any(f.priority == cls.priority for f in FAMILIES.values()):
        raise ValueError(f"family {cls.name!r}: priority {cls.priority} is taken")
    FAMILIES[cls.name] = cls()
    return cls


for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "base"):
    importlib.import_module(f"{__name__}.{_module}")

# from the plainest family to the most distinctive (``Family.priority``)
ARCHITECTURES = tuple(sorted(FAMILIES, key=lambda name: FAMILIES[name].priority))


def from_hf_config(hf: dict, where: str = "config.json") -> tuple[str, TransformerConfig]:
    """(architecture, the Switchyard model config) of a Hugging Face ``config.json``."""
    arch = hf.get("model_type")
    if arch not in ARCHITECTURES:
        raise InteropError(f"{where}: model_type={arch!r}: not supported; Switchyard reads {', '.join(ARCHITECTURES)}")
    return arch, FAMILIES[arch].from_hf_config(hf, where)


def infer_architecture(cfg: TransformerConfig) -> str:
    """The Hugging Face architecture a Switchyard model is exported as (by its distinctive pieces)."""
    return next(name for name in reversed(ARCHITECTURES) if FAMILIES[name].matches(cfg))


def to_hf_config(arch: str, cfg: TransformerConfig, dtype: str) -> dict:
    """The ``config.json`` of ``cfg`` as ``arch``; ``InteropError`` when the model is not one."""
    return FAMILIES[arch].to_hf_config(cfg, dtype)


def tensors(arch: str, cfg: TransformerConfig, interleaved: bool = True) -> list[Tensor]:
    """Every Switchyard variable of ``cfg`` (unrolled layout) with its Hugging Face tensors."""
    return FAMILIES[arch].tensors(cfg, interleaved)


def unread_layers(hf: dict):
    """How many layers after ``num_hidden_layers`` a ``config.json``'s model folder may hold that
    Switchyard does not read (DeepSeek-V3's multi-token prediction); 0 for an unknown model_type."""
    arch = hf.get("model_type")
    return FAMILIES[arch].unread_layers(hf) if arch in ARCHITECTURES else 0


__all__ = ["ARCHITECTURES", "FAMILIES", "Family", "InteropError", "Tensor", "from_hf_config", "infer_architecture",
           "register", "tensors", "to_hf_config", "unread_layers"]
