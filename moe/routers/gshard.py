"""``gshard``: GShard's top-2 with a randomly used second expert.

Shape letters: see ``moe/__init__.py``.

The best expert always; the second only with probability ``min(1, g2 / threshold)``, g2
its gate after normalising the top two (GShard's random routing; Mesh-TF's "random" second
policy). An unused second choice has expert id E (none) and gate 0 and takes no capacity. The
token draws its uniform as the random router does (layout-invariant, a fixed seed in eval). The
load-balance loss counts first choices, as in GShard.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe.fields import StrictFields, formerly, positive_finite
from moe.routers import register
from moe.routers.base import (
    RouteInput,
    Routing,
    expert_load,
    load_balance_loss,
    router_entropy,
    router_z_loss,
    token_uniforms,
    top_k,
)
from moe.routers.learned import LearnedRouter


@dataclasses.dataclass
class GShardOptions(StrictFields):
    threshold: float = formerly(0.2, "gshard_threshold")  # the second expert's use: min(1, g2 / threshold)

    def check(self) -> GShardOptions:
        if not positive_finite(self.threshold):
            self._fail("threshold", "must be a number > 0")
        return self


@register
class GShard(LearnedRouter):
    name = "gshard"
    stochastic = True
    Options = GShardOptions

    @classmethod
    def check(cls, cfg) -> None:
        cls.need_k(cfg, 2, "the gshard router is top-2")

    def __call__(self, inp: RouteInput) -> Routing:
        draw_key = self.draw_key(inp)
        jitter_key = None if inp.key is None else jax.random.fold_in(inp.key, 1)  # never the draw's key
        logits_BSE = self.logits(inp.x_BSD, jitter_key)
        return gshard_route(logits_BSE, draw_key, inp.positions_BS, self.options.threshold)


def gshard_route(logits_BSE: jax.Array, key: jax.Array, positions_BS: jax.Array, threshold: float) -> Routing:
    """GShard top-2 routing from float32 logits (see the module docstring)."""
    logits_BSE = logits_BSE.astype(jnp.float32)
    e = logits_BSE.shape[-1]
    probs_BSE = jax.nn.softmax(logits_BSE, axis=-1)
    top_BS2, ids_BS2 = top_k(probs_BSE, 2)
    gates_BS2 = top_BS2 / jnp.sum(top_BS2, axis=-1, keepdims=True)
    u_BS = token_uniforms(key, positions_BS, 1)[..., 0]
    second_BS = u_BS < jax.lax.stop_gradient(gates_BS2[..., 1]) / threshold
    ids_BS2 = jnp.stack([ids_BS2[..., 0], jnp.where(second_BS, ids_BS2[..., 1], e)], axis=-1)
    gates_BS2 = gates_BS2 * jnp.stack([jnp.ones_like(second_BS), second_BS], axis=-1).astype(jnp.float32)
    routed_E = jnp.sum(jax.nn.one_hot(ids_BS2, e, dtype=jnp.float32), axis=(0, 1, 2))  # E (none) is all zeros
    return Routing(
        expert_ids=ids_BS2,
        gates=gates_BS2,
        aux_loss=load_balance_loss(probs_BSE, expert_load(ids_BS2[..., :1], e)),
        z_loss=router_z_loss(logits_BSE),
        expert_load=routed_E / jnp.sum(routed_E),
        router_entropy=router_entropy(logits_BSE, probs_BSE),
    )
