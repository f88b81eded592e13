"""``sigmoid``: DeepSeek-V3's router. Sigmoid scores, group-limited top-k, a scaling factor, and
the auxiliary-loss-free bias.

Shape letters: see ``moe/__init__.py``; here also W expert groups and Y experts per group.

Each expert scores sigmoid(x . w_e). The choice adds a per-expert ``bias`` (model state, no
gradient, moved by ``gamma`` toward equal load once per training step, as ``loss_free``).
With ``num_groups`` > 1 the experts form equal groups, each group is rated by the sum of its two best
biased scores, and a token chooses its k experts among its ``topk_groups`` best groups only (DeepSeek
keeps each token's experts on few devices this way). The gates are the chosen scores without the bias,
divided by their sum (``norm_topk_prob``: by default when k > 1) and multiplied by
``routed_scaling``. The load-balance loss (``aux_loss_coef``; DeepSeek-V3 keeps a tiny one) uses the
scores normalised to sum to 1.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from moe.fields import FieldError, formerly, positive_finite, positive_int
from moe.params import RouterState
from moe.routers import register
from moe.routers.base import RouteInput, Routing, expert_load, load_balance_loss, router_z_loss, top_k
from moe.routers.learned import LearnedRouter, renormalises
from moe.routers.loss_free import LossFreeOptions, loss_free_bias_update


@dataclasses.dataclass
class SigmoidOptions(LossFreeOptions):
    # experts in num_groups equal groups; a token picks its topk_groups best groups (by the sum of each
    # group's two best scores) and its k experts among them
    num_groups: int = formerly(1, "num_groups")
    topk_groups: int = formerly(1, "topk_groups")
    routed_scaling: float = formerly(1.0, "routed_scaling")  # the gates are multiplied by this

    def check(self) -> SigmoidOptions:
        super().check()
        for name in ("num_groups", "topk_groups"):
            if not positive_int(getattr(self, name)):
                self._fail(name, "must be a positive integer")
        if self.topk_groups > self.num_groups:
            self._fail("topk_groups", f"must be in [1, num_groups={self.num_groups}]")
        if not positive_finite(self.routed_scaling):
            self._fail("routed_scaling", "must be a number > 0")
        return self


@register
class Sigmoid(LearnedRouter):
    name = "sigmoid"
    Options = SigmoidOptions

    @classmethod
    def check(cls, cfg) -> None:
        e, o = cfg.num_experts, cls.options_of(cfg)
        g = o.num_groups
        if e % g:
            raise cls.option_error(cfg, "num_groups", f"must be a positive divisor of num_experts={e}")
        if g > 1 and e // g < 2:
            raise cls.option_error(cfg, "num_groups", "each group needs at least 2 experts (groups are rated by their two best)")
        if cfg.experts_per_token > o.topk_groups * (e // g):
            raise FieldError("MoEConfig", "experts_per_token", cfg.experts_per_token, f"more than the "
                             f"{o.topk_groups * (e // g)} experts of router_options.sigmoid.topk_groups={o.topk_groups} groups")

    def __init__(self, cfg, d_model, *, key, rngs, eval_seed=0, vocab_size=0):
        super().__init__(cfg, d_model, key=key, rngs=rngs, eval_seed=eval_seed, vocab_size=vocab_size)
        self.bias = RouterState(jnp.zeros((cfg.num_experts,), jnp.float32), logical_axes=(None,))

    def __call__(self, inp: RouteInput) -> Routing:
        c, o = self.cfg, self.options
        return sigmoid_route(self.logits(inp.x_BSD, inp.key), self.bias[...], c.experts_per_token, o.num_groups,
                             o.topk_groups, o.routed_scaling, c.norm_topk_prob)

    def update(self, expert_load_E: jax.Array) -> None:
        self.bias[...] = loss_free_bias_update(self.bias[...], expert_load_E, self.options.gamma)


def sigmoid_route(logits_BSE, bias_E, k: int, groups: int = 1, topk_groups: int = 1, scaling: float = 1.0,
                  norm_topk_prob: str = "auto") -> Routing:
    logits_BSE = logits_BSE.astype(jnp.float32)
    b, s, e = logits_BSE.shape
    scores_BSE = jax.nn.sigmoid(logits_BSE)
    choice_BSE = jax.lax.stop_gradient(scores_BSE) + jax.lax.stop_gradient(bias_E)[None, None, :]
    if groups > 1:
        grouped_BSWY = choice_BSE.reshape(b, s, groups, e // groups)
        best2, _ = top_k(grouped_BSWY.reshape(b * s, groups, e // groups), 2)
        rating_BSW = jnp.sum(best2, axis=-1).reshape(b, s, groups)
        _, chosen_BSG = top_k(rating_BSW, topk_groups)
        keep_BSW = jnp.any(jnp.arange(groups)[None, None, :, None] == chosen_BSG[:, :, None, :], axis=-1)
        keep_BSE = jnp.repeat(keep_BSW, e // groups, axis=-1)
        choice_BSE = jnp.where(keep_BSE, choice_BSE, -jnp.inf)
    _, ids_BSK = top_k(choice_BSE, k)
    gates_BSK = jnp.take_along_axis(scores_BSE, ids_BSK, axis=-1)
    if renormalises(k, norm_topk_prob):
        gates_BSK = gates_BSK / (jnp.sum(gates_BSK, axis=-1, keepdims=True) + 1e-20)
    gates_BSK = gates_BSK * scaling
    load_E = expert_load(ids_BSK, e)
    probs_BSE = scores_BSE / jnp.sum(scores_BSE, axis=-1, keepdims=True)
    entropy = -jnp.mean(jnp.sum(probs_BSE * jnp.log(jnp.maximum(probs_BSE, 1e-30)), axis=-1))
    return Routing(
        expert_ids=ids_BSK,
        gates=gates_BSK,
        aux_loss=load_balance_loss(probs_BSE, load_E),
        z_loss=router_z_loss(logits_BSE),
        expert_load=load_E,
        router_entropy=entropy,
    )
