"""``stable``: StableMoE's two training stages (Dai et al. 2022).

Shape letters: see ``moe/__init__.py``; V vocabulary.

A learned router keeps moving tokens between experts while it trains, so every expert learns
from a moving token set (routing fluctuation). StableMoE learns the routing first, then freezes
it:

* **Stage 1** (training steps before ``freeze_step``): a learned top-k router (``w`` [D, E],
  exactly ``topk``: its gates, balance loss and z-loss) routes. Beside it a token-level router,
  ``distill`` [V, E] logits per token id, learns to predict the router's choices (cross-entropy to
  the chosen experts, weighted ``DISTILL_WEIGHT``; its gradient reaches only ``distill``).
* **Stage 2** (from ``freeze_step``): at the switch (``update``, once per training step) the
  distilled router's top k per token id become a fixed table ``table`` [V, K] (model state; with
  ``balance`` > 0 under a cap on each expert's share of the training split's token mass,
  ``counts`` [V], see ``balanced_choice``); from
  then on a token's experts are its id's row, and the learned router only gates them
  (``gate``: "softmax", its probabilities of the table's experts, renormalised for k > 1
  as ``topk``; "sigmoid", StableMoE's sigmoid(x . w_e); "one", 1/k each as a hash router), with
  no balance loss. Token ids the distillation never saw keep the ``hash`` router's experts. With
  gate "one" the learned router then neither routes nor gates: no z-loss (nothing pushes on the
  hidden states for it) and router entropy 0 (a token's experts are a point mass, as ``hash``'s).
  With "softmax" or "sigmoid" its logits still set the gates, so their z-loss (keeping them
  bounded) and the entropy of its softmax stay.

Capacity: ``balance`` caps each expert's share of the frozen table's token mass at that
many equal shares, so each expert gets ``capacity_factor`` x ``balance`` equal shares of
slots (``capacity``). Shapes are fixed at compile time while the stage is a traced step count, so
stage 1 runs with the same slots (``topk`` at that capacity factor). An id whose own share exceeds
the cap (a byte tokenizer's space) still overflows its expert: the cap bounds the others.

Routing depends only on the token itself (its id, and its own hidden state for the gates), so it
is causal; after the switch a token's experts never change (routing churn 0, H(expert | token) 0).
The step counter ``step`` (model state) says which stage a layer is in, so a resumed run and an
evaluation of a checkpoint route as training did at that step. The options (``StableOptions``,
``model.moe.router_options.stable.*``) also take ``seed``, the ``hash`` table's that unseen ids keep.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moe.fields import FieldError, finite, formerly
from moe.params import RouterState, sharded_param
from moe.routers import register
from moe.routers.base import RouteInput, Routing, expert_load, top_k
from moe.routers.hashing import HashOptions, counts_for, hash_table
from moe.routers.learned import LearnedRouter, renormalises, topk_route
from sharding.mesh import current_mesh

# The distillation loss's weight. It trains only the token-level logits, and Adam's update does
# not depend on a gradient's scale; it is small so that it leaves the model's gradient norm (and
# its clipping) as topk's.
DISTILL_WEIGHT = 1e-2
GATES = ("softmax", "sigmoid", "one")  # StableOptions.gate


@dataclasses.dataclass
class StableOptions(HashOptions):
    # training steps of stage 1 (the learned router routes, and a token -> expert table is distilled from
    # its choices); from this step on the frozen table routes. The defaults are the best measured on
    # configs/default.py (README, "Learned routing that beats dense")
    freeze_step: int = formerly(10, "stable_freeze_step")
    # at the freeze, no expert may take more than this multiple of an equal share of the training split's
    # token mass: ids in decreasing frequency take their best distilled experts with room left (the least
    # loaded when none has); 0 = every id takes its best experts, whatever the balance
    balance: float = formerly(1.25, "stable_balance")
    # the gates once the table routes: "softmax" (the learned router's probabilities of the table's experts,
    # renormalised for k > 1), "sigmoid" (StableMoE's sigmoid(x . w_e)), "one" (1/k each, as hash)
    gate: str = formerly("one", "stable_gate")

    def check(self) -> StableOptions:
        super().check()
        if not isinstance(self.freeze_step, int) or isinstance(self.freeze_step, bool) or self.freeze_step < 0:
            self._fail("freeze_step", "must be an integer >= 0 (a training step)")
        if not finite(self.balance) or not (self.balance == 0 or self.balance >= 1):
            self._fail("balance", "must be 0 (off) or a number >= 1 (a multiple of an equal share)")
        self._choose("gate", GATES)
        return self


@register
class Stable(LearnedRouter):
    name = "stable"
    wants_token_counts = True  # for the balanced freeze
    Options = StableOptions

    def __init__(self, cfg, d_model, *, key, rngs, eval_seed=0, vocab_size=0):
        super().__init__(cfg, d_model, key=key, rngs=rngs, eval_seed=eval_seed, vocab_size=vocab_size)
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise FieldError("MoEConfig", "router", cfg.router, "the stable router needs the vocabulary size (>= 1)")
        e, k = cfg.num_experts, cfg.experts_per_token
        self.distill = sharded_param(None, (vocab_size, e), (None, None), 0.0, jnp.float32, init="zeros", decay=False)
        self.table = RouterState(jnp.asarray(hash_table(vocab_size, e, k, self.options.seed)), logical_axes=(None, None))
        self.step = RouterState(jnp.zeros((), jnp.int32), logical_axes=())
        self.counts = RouterState(jnp.zeros((vocab_size,), jnp.float32), logical_axes=(None,))

    def fit(self, token_counts_V) -> None:
        counts_V = counts_for(token_counts_V, self.counts.shape[0]).astype(np.float32)
        self.counts[...] = jax.device_put(counts_V, self.counts[...].sharding)

    def __call__(self, inp: RouteInput) -> Routing:
        cfg, opts = self.cfg, self.options
        if inp.token_ids_BS is None:
            raise ValueError("MoEConfig.router='stable': the layer needs token_ids")
        tokens_BS, k = inp.token_ids_BS, cfg.experts_per_token
        logits_BSE = self.logits(inp.x_BSD, inp.key)
        learned = topk_route(logits_BSE, k, cfg.norm_topk_prob)
        frozen = self.step[...] >= opts.freeze_step
        spec = None if current_mesh() is None else jax.typeof(learned.expert_ids).sharding.spec  # the routing's layout
        table_BSK = self.table[...].at[tokens_BS].get(mode="clip", out_sharding=spec).astype(jnp.int32)
        ids_BSK = jnp.where(frozen, table_BSK, learned.expert_ids)
        gates_BSK = jnp.take_along_axis(jax.nn.softmax(logits_BSE, axis=-1), ids_BSK, axis=-1)
        if renormalises(k, cfg.norm_topk_prob):
            gates_BSK = gates_BSK / jnp.sum(gates_BSK, axis=-1, keepdims=True)
        if opts.gate != "softmax":  # stage 2's own gates
            if opts.gate == "sigmoid":
                frozen_gates_BSK = jax.nn.sigmoid(jnp.take_along_axis(logits_BSE, ids_BSK, axis=-1))
            else:
                frozen_gates_BSK = jnp.full_like(gates_BSK, 1.0 / k)
            gates_BSK = jnp.where(frozen, frozen_gates_BSK, gates_BSK)
        distill = distill_loss(self.distill[...].at[tokens_BS].get(mode="clip", out_sharding=spec), learned.expert_ids)
        idle = jnp.logical_and(frozen, opts.gate == "one")  # the learned router neither routes nor gates
        zero = jnp.zeros((), jnp.float32)
        return Routing(
            expert_ids=ids_BSK,
            gates=gates_BSK,
            aux_loss=jnp.where(frozen, zero, learned.aux_loss),
            z_loss=jnp.where(idle, zero, learned.z_loss),
            expert_load=expert_load(ids_BSK, cfg.num_experts),
            router_entropy=jnp.where(idle, zero, learned.router_entropy),
            own_loss=jnp.where(frozen, zero, DISTILL_WEIGHT * distill),
        )

    def capacity(self, group_tokens: int, deterministic: bool) -> int:
        """The config's capacity with ``balance`` x its capacity factor (see the module's docstring);
        the config's own without a cap (``balance`` 0)."""
        cfg = self.cfg
        cf = cfg.eval_capacity_factor if deterministic else cfg.capacity_factor
        if not cf:
            return group_tokens
        return cfg.slots(group_tokens, cf * self.slot_scale(cfg))

    @classmethod
    def slot_scale(cls, cfg) -> float:
        return max(cls.options_of(cfg).balance, 1.0)

    def update(self, expert_load_E: jax.Array) -> None:
        """Count the step; at ``freeze_step`` freeze the distilled choices into ``table``."""
        cfg, opts = self.cfg, self.options
        step = self.step[...] + 1

        def freeze(table_VK):  # only at the freeze step
            logits_VE = jax.lax.stop_gradient(self.distill[...])
            seen_V1 = jnp.any(logits_VE != 0, axis=-1, keepdims=True)  # ids the distillation never saw keep hash's
            if opts.balance:
                distilled_VK = balanced_choice(logits_VE, self.counts[...], cfg.experts_per_token, opts.balance)
            else:
                distilled_VK = top_k(logits_VE, cfg.experts_per_token)[1]
            return jnp.where(seen_V1, distilled_VK, table_VK)

        self.table[...] = jax.lax.cond(step == opts.freeze_step, freeze, lambda t: t, self.table[...])
        self.step[...] = step


def balanced_choice(scores_VE: jax.Array, counts_V: jax.Array, k: int, limit: float) -> jax.Array:
    """int32 [V, K]: token ids in decreasing count each take, one by one, the k best-scoring experts
    whose token mass stays within ``limit`` x an equal share (sum(counts) / E); an id for which no
    expert has room takes the least loaded one. Each choice adds count / k to its expert's mass."""
    num_tokens, num_experts = scores_VE.shape
    cap = limit * jnp.sum(counts_V) / num_experts
    order_V = jnp.argsort(-counts_V, stable=True)

    def take(i, carry):
        table_VK, mass_E = carry
        token = order_V[i]
        share = counts_V[token] / k
        scores_E, free_E, row = scores_VE[token], jnp.ones((num_experts,), bool), []
        for _ in range(k):
            room_E = free_E & (mass_E + share <= cap)
            best = jnp.argmax(jnp.where(room_E, scores_E, -jnp.inf))
            least = jnp.argmin(jnp.where(free_E, mass_E, jnp.inf))
            pick = jnp.where(jnp.any(room_E), best, least).astype(jnp.int32)
            row.append(pick)
            free_E = free_E.at[pick].set(False)
            mass_E = mass_E.at[pick].add(share)
        return table_VK.at[token].set(jnp.stack(row)), mass_E

    table_VK = jnp.zeros((num_tokens, k), jnp.int32)
    return jax.lax.fori_loop(0, num_tokens, take, (table_VK, jnp.zeros((num_experts,), jnp.float32)))[0]


def distill_loss(logits_BSE: jax.Array, expert_ids_BSK: jax.Array) -> jax.Array:
    """Mean over tokens of the cross-entropy from the token-level logits to the router's k choices
    (each 1/k of the target); no gradient reaches the choices."""
    num_experts = logits_BSE.shape[-1]
    target_BSE = jnp.mean(jax.nn.one_hot(jax.lax.stop_gradient(expert_ids_BSK), num_experts, dtype=jnp.float32), axis=2)
    return -jnp.mean(jnp.sum(target_BSE * jax.nn.log_softmax(logits_BSE.astype(jnp.float32), axis=-1), axis=-1))
