"""The model: MoE layers and the transformer. Pure math; no I/O, no environment, no command line.

Shape letters, used as suffixes of array names (``x_BSD``) in every file of this package:

  B batch rows            S positions (queries)        P key positions (attention, KV cache)
  D model width           F FFN hidden width (dense: d_ff; an expert: expert_d_ff)
  V vocabulary            N attention heads            H head dimension
  E experts               K experts per token          L experts on one device
  M devices along the ``expert`` mesh axis
  T tokens on one device (B*S, inside ``shard_map``)
  G capacity groups       U tokens per group           A assignments (K per token)
  C slots per expert and group                         X slots of a dispatch buffer (E*G*C)
  R rows of a regrouped buffer (dropless)              Q rows a ``move_rows`` writes

A trailing 1 marks a size-1 axis kept for broadcasting (``ids_BS1``).
"""

from __future__ import annotations

import importlib

# the package's names, imported when first used: ``moe.config`` (the typed settings, no JAX) can be
# read by a command line before JAX is imported
_EXPORTS = {"FFNConfig": "moe.config", "MoEConfig": "moe.config", "TransformerConfig": "moe.config",
            "MoEFeedForward": "moe.layer", "ROUTERS": "moe.routers", "Routing": "moe.routers"}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moe' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
