"""``loss_free``: DeepSeek-V3's auxiliary-loss-free balancing.

Shape letters: see ``moe/__init__.py``.

Experts are chosen by top-k of the router probabilities plus a per-expert ``bias`` (model state,
no gradient); the gates are the probabilities alone (renormalised for k > 1); there is no
load-balance loss. Once per training step (``update``) the bias moves by ``gamma``
toward equal load, from that step's global counts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe.fields import StrictFields, formerly, positive_finite
from moe.params import RouterState
from moe.routers import register
from moe.routers.base import RouteInput, Routing, expert_load, router_entropy, router_z_loss, top_k
from moe.routers.learned import LearnedRouter, renormalises


@dataclasses.dataclass
class LossFreeOptions(StrictFields):
    gamma: float = formerly(1e-3, "loss_free_gamma")  # the bias's step per training step toward equal load

    def check(self) -> LossFreeOptions:
        if not positive_finite(self.gamma):
            self._fail("gamma", "must be a number > 0")
        return self


@register
class LossFree(LearnedRouter):
    name = "loss_free"
    Options = LossFreeOptions

    def __init__(self, cfg, d_model, *, key, rngs, eval_seed=0, vocab_size=0):
        super().__init__(cfg, d_model, key=key, rngs=rngs, eval_seed=eval_seed, vocab_size=vocab_size)
        self.bias = RouterState(jnp.zeros((cfg.num_experts,), jnp.float32), logical_axes=(None,))

    def __call__(self, inp: RouteInput) -> Routing:
        return loss_free_route(self.logits(inp.x_BSD, inp.key), self.bias[...], self.cfg.experts_per_token,
                               self.cfg.norm_topk_prob)

    def update(self, expert_load_E: jax.Array) -> None:
        self.bias[...] = loss_free_bias_update(self.bias[...], expert_load_E, self.options.gamma)


def loss_free_route(logits_BSE: jax.Array, bias_E: jax.Array, k: int, norm_topk_prob: str = "auto") -> Routing:
    """Top-k of (probabilities + bias), gated by the probabilities alone (renormalised as
    ``norm_topk_prob`` says: by default for k > 1).
    The bias carries no gradient; ``aux_loss`` is 0 (balance comes from the bias)."""
    logits_BSE = logits_BSE.astype(jnp.float32)
    num_experts = logits_BSE.shape[-1]
    probs_BSE = jax.nn.softmax(logits_BSE, axis=-1)
    _, ids_BSK = top_k(jax.lax.stop_gradient(probs_BSE) + jax.lax.stop_gradient(bias_E)[None, None, :], k)
    gates_BSK = jnp.take_along_axis(probs_BSE, ids_BSK, axis=-1)
    if renormalises(k, norm_topk_prob):
        gates_BSK = gates_BSK / jnp.sum(gates_BSK, axis=-1, keepdims=True)
    return Routing(
        expert_ids=ids_BSK,
        gates=gates_BSK,
        aux_loss=jnp.zeros((), jnp.float32),
        z_loss=router_z_loss(logits_BSE),
        expert_load=expert_load(ids_BSK, num_experts),
        router_entropy=router_entropy(logits_BSE, probs_BSE),
    )


def loss_free_bias_update(bias_E: jax.Array, load_E: jax.Array, gamma: float) -> jax.Array:
    """bias_e + gamma * sign(mean load - load_e): underloaded experts up, overloaded down."""
    return bias_E + gamma * jnp.sign(jnp.mean(load_E) - load_E)
