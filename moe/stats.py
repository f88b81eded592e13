"""The MoE statistics the model hands to training: typed pytrees, not string-keyed dicts.

``LayerStats``: what one ``MoEFeedForward`` call reports over the global batch (its router losses
with their coefficients, drops, entropy, load), and each token's first expert for the router
telemetry. ``MoEStats``: the model's, from every MoE layer's (``MoEStats.combine``): the losses
summed over the layers, the statistics averaged, and each layer's kept under ``per_layer``. The
first experts leave the model as their own output (``Transformer.routes``), never through the
loss.

Both are registered dataclasses, so ``jax.tree.map`` averages them over micro-batches and they
cross ``jit`` and ``lax.scan`` like any pytree.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# the names of a layer's statistics in the metrics row (``moe/layer<i>/<name>``), in its order
LAYER_METRICS = ("aux_loss", "z_loss", "expert_load", "dropped_fraction", "router_entropy", "load_imbalance")


def load_imbalance(load_E: jax.Array) -> jax.Array:
    """max / mean of the per-expert load (1 = perfectly balanced, E = everything on one expert)."""
    return jnp.max(load_E) * load_E.shape[-1] / jnp.maximum(jnp.sum(load_E), 1e-9)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerStats:
    """One MoE layer's over the global batch: float32 scalars but ``expert_load`` [E]."""

    aux_loss: jax.Array  # aux_loss_coef * E * sum_i f_i P_i (0 where the router has none)
    z_loss: jax.Array  # z_loss_coef * mean logsumexp(logits)^2
    router_loss: jax.Array  # what the layer adds to the training loss: the two above plus a router's own
    dropped_fraction: jax.Array  # share of assignments without a slot (expert_choice: tokens no expert took)
    router_entropy: jax.Array  # mean entropy (nats) of the router distribution; 0 without one
    expert_load: jax.Array  # [E] share of the assignments sent to each expert
    load_imbalance: jax.Array  # max / mean of expert_load
    # [B,S] int32: each token's first expert (E where none took it), for the router telemetry;
    # None once the model has taken it out (``MoEStats.combine``)
    first_expert: jax.Array | None = None

    def metrics(self) -> dict[str, jax.Array]:
        """The layer's entries of a metrics row, by ``LAYER_METRICS`` name."""
        return {name: getattr(self, name) for name in LAYER_METRICS}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoEStats:
    """The model's MoE statistics (zeros for a dense model).

    Router losses (``aux_loss``, ``z_loss``, ``router_loss``) are summed over the layers, as in
    Switch Transformer and GShard: each layer adds its own ``aux_loss_coef * E * sum f_i P_i``,
    so a coefficient means the same at any depth. The statistics (``dropped_fraction``,
    ``router_entropy``, ``expert_load``) are averaged; ``load_imbalance`` is the mean over layers
    of each layer's. ``per_layer["layer<i>"]`` holds the MoE block with index i's own (its
    ``first_expert`` taken out)."""

    aux_loss: jax.Array
    z_loss: jax.Array
    router_loss: jax.Array
    dropped_fraction: jax.Array
    router_entropy: jax.Array
    expert_load: jax.Array
    load_imbalance: jax.Array
    per_layer: dict[str, LayerStats]

    @classmethod
    def combine(cls, layers: dict[int, LayerStats], num_experts: int) -> tuple[MoEStats, dict[str, jax.Array]]:
        """(the model's statistics, {"layer<i>": [B,S] first expert}) from each MoE block's."""
        zero = jnp.zeros((), jnp.float32)
        if not layers:
            return cls(zero, zero, zero, zero, zero, jnp.zeros((num_experts,), jnp.float32), zero, {}), {}
        stats = list(layers.values())
        total = {k: sum(getattr(s, k) for s in stats) for k in ("aux_loss", "z_loss", "router_loss")}
        mean = {k: sum(getattr(s, k) for s in stats) / len(stats)
                for k in ("dropped_fraction", "router_entropy", "expert_load")}
        per_layer = {f"layer{i}": dataclasses.replace(s, first_expert=None) for i, s in layers.items()}
        imbalance = sum(s.load_imbalance for s in stats) / len(stats)
        routes = {f"layer{i}": s.first_expert for i, s in layers.items()}
        return cls(**total, **mean, load_imbalance=imbalance, per_layer=per_layer), routes

    def metrics(self) -> dict[str, jax.Array]:
        """The ``moe/...`` entries of a training step's metrics row (per layer as ``moe/layer<i>/<name>``)."""
        out = {f"moe/{f.name}": getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "per_layer"}
        for layer, stats in self.per_layer.items():
            out.update({f"moe/{layer}/{name}": value for name, value in stats.metrics().items()})
        return out
