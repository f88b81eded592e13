"""Learned softmax routers: ``topk`` (Switch for k=1, Mixtral for k>1) and ``frozen``.

Shape letters: see ``moe/__init__.py``.

The router weights ``w`` [D, E] (float32, replicated) score each token; the top-k probabilities
choose its experts. ``frozen`` (Fan et al. 2024) keeps the same initial weights as model state,
never trained. Optional multiplicative input jitter in training only. ``LearnedRouter`` is the
shared part of every router with a ``w``: gshard, loss_free and expert_choice build on it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moe.params import RouterState, compute_value, sharded_param, spec_of
from moe.routers import register
from moe.routers.base import (
    ACT_AXES,
    RouteInput,
    Router,
    Routing,
    expert_load,
    load_balance_loss,
    router_entropy,
    router_z_loss,
    top_k,
)

ROUTER_AXES = ("router_in", "router_out")


class LearnedRouter(Router):
    """A router with weights ``w`` [D, E] scoring every token (a ``Param``, or ``RouterState`` if frozen)."""

    frozen = False
    scores_tokens = True

    def __init__(self, cfg, d_model, *, key, rngs, eval_seed=0, vocab_size=0):
        super().__init__(cfg, d_model, key=key, rngs=rngs, eval_seed=eval_seed, vocab_size=vocab_size)
        kind = RouterState if self.frozen else nnx.Param
        std = 0.1 * d_model**-0.5
        self.w = sharded_param(key, (d_model, cfg.num_experts), ROUTER_AXES, std, jnp.float32, kind=kind)
        # moe.router_bias: a learned bias on the logits (GPT-OSS)
        self.b = (sharded_param(None, (cfg.num_experts,), ROUTER_AXES[1:], 0.0, jnp.float32, kind=kind, init="zeros",
                                decay=False) if cfg.router_bias else nnx.data(None))

    def logits(self, x_BSD: jax.Array, key: jax.Array | None) -> jax.Array:
        """float32 [B,S,E] router logits; in training with ``router_jitter`` the input is first
        multiplied by U(1-eps, 1+eps) noise (from ``key``, else the router's stream)."""
        x32_BSD = x_BSD.astype(jnp.float32)
        eps = self.cfg.router_jitter
        if eps > 0 and not self.deterministic:
            key = self.rngs() if key is None else key
            noise = jax.random.uniform(key, x32_BSD.shape, jnp.float32, 1.0 - eps, 1.0 + eps, out_sharding=spec_of(ACT_AXES))
            x32_BSD = x32_BSD * noise
        w_DE = compute_value(self.w, ROUTER_AXES).astype(jnp.float32)
        if self.frozen:
            w_DE = jax.lax.stop_gradient(w_DE)
        logits_BSE = jnp.einsum("bsd,de->bse", x32_BSD, w_DE)
        if self.b is not None:
            b_E = compute_value(self.b, ROUTER_AXES[1:])
            logits_BSE = logits_BSE + (jax.lax.stop_gradient(b_E) if self.frozen else b_E)[None, None]
        return logits_BSE


@register
class TopK(LearnedRouter):
    name = "topk"

    def __call__(self, inp: RouteInput) -> Routing:
        return topk_route(self.logits(inp.x_BSD, inp.key), self.cfg.experts_per_token, self.cfg.norm_topk_prob)


@register
class Frozen(TopK):
    name = "frozen"
    frozen = True


def renormalises(k: int, norm_topk_prob: str) -> bool:
    """Whether the k chosen gates are divided by their sum (``MoEConfig.norm_topk_prob``)."""
    return norm_topk_prob == "on" or (norm_topk_prob == "auto" and k > 1)


def topk_route(logits_BSE: jax.Array, k: int, norm_topk_prob: str = "auto") -> Routing:
    """Learned top-k routing from float32 router logits: the chosen probabilities gate, divided by
    their sum by default when k > 1 (Mixtral; Switch's k = 1 keeps its probability), always with
    ``norm_topk_prob="on"``, never with "off" (Qwen2-MoE, OLMoE)."""
    logits_BSE = logits_BSE.astype(jnp.float32)
    num_experts = logits_BSE.shape[-1]
    probs_BSE = jax.nn.softmax(logits_BSE, axis=-1)
    gates_BSK, ids_BSK = top_k(probs_BSE, k)
    if renormalises(k, norm_topk_prob):
        gates_BSK = gates_BSK / jnp.sum(gates_BSK, axis=-1, keepdims=True)
    load_E = expert_load(ids_BSK, num_experts)
    return Routing(
        expert_ids=ids_BSK.astype(jnp.int32),
        gates=gates_BSK,
        aux_loss=load_balance_loss(probs_BSE, load_E),
        z_loss=router_z_loss(logits_BSE),
        expert_load=load_E,
        router_entropy=router_entropy(logits_BSE, probs_BSE),
    )
