"""Random routers: ``random`` (a fresh draw per token) and ``thor`` (THOR's stochastic experts).

Shape letters: see ``moe/__init__.py``.

  * ``random``  k distinct uniformly random experts per token, drawn again on every call from the
                router's stream (an explicit key if given; a fixed key in eval mode). Token
                (b, s) draws from ``fold_in(fold_in(key, b), positions[b, s])``, so the draw does not
                depend on the device layout and cached decoding routes as the full sequence does.
  * ``thor``    (Zuo et al. 2022; k = 1) in training one uniformly random expert for the whole
                batch takes every token (``Routing.single_expert``: the layer runs it with no
                dispatch); in eval a random expert per token with the fixed key, as ``random``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe.fields import StrictFields, finite, formerly
from moe.routers import register
from moe.routers.base import RouteInput, Router, Routing, equal_gates, fixed_route, token_uniforms


@register
class Random(Router):
    name = "random"
    stochastic = True

    def __call__(self, inp: RouteInput) -> Routing:
        return random_route(self.draw_key(inp), inp.positions_BS, self.cfg.num_experts, self.cfg.experts_per_token)


@dataclasses.dataclass
class ThorOptions(StrictFields):
    # weight of THOR's consistency loss, the symmetric KL between the predictions of two forward passes
    # through independently drawn experts (0 = one pass, no consistency loss)
    consistency: float = formerly(0.0, "thor_consistency")

    def check(self) -> ThorOptions:
        if not finite(self.consistency) or self.consistency < 0:
            self._fail("consistency", "must be a finite number >= 0")
        return self


@register
class Thor(Random):
    name = "thor"
    consistency = True
    Options = ThorOptions

    @classmethod
    def check(cls, cfg) -> None:
        cls.need_k(cfg, 1, "the thor router sends each token to one expert")

    @classmethod
    def consistency_weight(cls, cfg) -> float:
        return cls.options_of(cfg).consistency

    def __call__(self, inp: RouteInput) -> Routing:
        if self.deterministic:
            return super().__call__(inp)
        expert = thor_expert(self.draw_key(inp), self.cfg.num_experts)
        return single_expert_route(expert, inp.positions_BS, self.cfg.num_experts)


def random_route(key: jax.Array, positions_BS: jax.Array, num_experts: int, k: int) -> Routing:
    """Uniformly random k distinct experts per token (see the module docstring)."""
    return fixed_route(token_uniforms(key, positions_BS, num_experts), k)


def thor_expert(key: jax.Array, num_experts: int) -> jax.Array:
    """THOR's draw for one layer and batch: an int32 scalar, uniform over the experts."""
    return jax.random.randint(key, (), 0, num_experts, dtype=jnp.int32)


def single_expert_route(expert: jax.Array, like_BS: jax.Array, num_experts: int) -> Routing:
    """Every token to ``expert`` with gate 1 (ids take ``like_BS``'s shape and sharding)."""
    ids_BS1 = (jnp.zeros_like(like_BS, dtype=jnp.int32) + expert)[..., None]
    return equal_gates(ids_BS1, jax.nn.one_hot(expert, num_experts, dtype=jnp.float32), single_expert=expert)
