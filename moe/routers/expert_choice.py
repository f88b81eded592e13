"""``expert_choice``: experts choose tokens (Zhou et al. 2022). NON-CAUSAL.

Shape letters: see ``moe/__init__.py``; G capacity groups, U tokens per group, C tokens each
expert takes.

In each group of U consecutive tokens (in (batch, seq) order) every expert takes the C tokens
with the highest router probability for it (ties to the earlier token); a chosen token's gate is
that probability, so a token may get several experts or none. C is the layer's capacity for the
group (``capacity_factor``, or ``eval_capacity_factor`` in eval when set). Returned token-side
with K = E slots (slot e holds expert e if it chose the token, else E: none), so both dispatches
run it unchanged. Whether a token is taken depends on the scores of later tokens in its group:
the language model refuses this router unless ``allow_non_causal_router``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moe.params import spec_of
from moe.routers import register
from moe.routers.base import ROUTE_AXES, RouteInput, Routing, router_entropy, router_z_loss
from moe.routers.learned import LearnedRouter


@register
class ExpertChoice(LearnedRouter):
    name = "expert_choice"
    causal = False
    ranks_group = True

    def __call__(self, inp: RouteInput) -> Routing:
        group = inp.group_tokens
        capacity = self.cfg.capacity(group, self.deterministic, always=True)
        group_spec, out_spec = spec_of(("batch", None, None)), spec_of(ROUTE_AXES)
        return expert_choice_route(self.logits(inp.x_BSD, inp.key), group, capacity, group_spec, out_spec)


def expert_choice_route(
    logits_BSE: jax.Array, group_tokens: int, capacity: int, group_spec=None, out_spec=None
) -> Routing:
    """Expert choice routing from float32 logits; under an explicit mesh ``group_spec`` is the
    [G, U, E] spec and ``out_spec`` the [B, S, E] one."""
    logits_BSE = logits_BSE.astype(jnp.float32)
    b, s, e = logits_BSE.shape
    probs_BSE = jax.nn.softmax(logits_BSE, axis=-1)
    probs_GUE = probs_BSE.reshape(b * s // group_tokens, group_tokens, e, out_sharding=group_spec)
    scores_GEU = jax.lax.stop_gradient(jnp.swapaxes(probs_GUE, 1, 2))
    values_GEC, index_GEC = jax.lax.top_k(scores_GEU, capacity)
    # chosen = ranked within the top C; top_k puts equal scores in token order, so a token tied
    # with the C-th is chosen iff it comes no later than the C-th
    kth_GE1, kth_index_GE1 = values_GEC[..., -1:], index_GEC[..., -1:]
    token_U = jnp.arange(group_tokens)
    chosen_GEU = (scores_GEU > kth_GE1) | ((scores_GEU == kth_GE1) & (token_U[None, None, :] <= kth_index_GE1))
    chosen_GUE = jnp.swapaxes(chosen_GEU, 1, 2)
    ids_BSE = jnp.where(chosen_GUE, jnp.arange(e, dtype=jnp.int32), e).reshape(b, s, e, out_sharding=out_spec)
    gates_BSE = jnp.where(chosen_GUE, probs_GUE, 0.0).reshape(b, s, e, out_sharding=out_spec)
    taken_E = jnp.sum(chosen_GUE, axis=(0, 1)).astype(jnp.float32)
    return Routing(
        expert_ids=ids_BSE,
        gates=gates_BSE,
        aux_loss=jnp.zeros((), jnp.float32),
        z_loss=router_z_loss(logits_BSE),
        expert_load=taken_E / jnp.sum(taken_E),
        router_entropy=router_entropy(logits_BSE, probs_BSE),
        dropped_fraction=jnp.mean(~jnp.any(chosen_GUE, axis=-1)),
    )
