"""Pure train and eval steps over (graphdef, state) pytrees, jitted once with explicit shardings.

Shape letters: B batch (global sequences), M micro-batches, S sequence, V vocabulary.

``TrainState`` holds everything a step changes: the step counter, the parameters, the
optimizer state and the model's other state (RNG counters of random routers / jitter).
``train_step(state, batch) -> (state, metrics)`` runs M micro-batches with ``lax.scan``,
accumulating gradients, then applies one optimizer update. It is jitted with the state's own
shardings in and out and the state donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe.transformer import Transformer


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any  # nnx.State of Params
    opt_state: Any
    model_state: Any  # nnx.State of everything else (RNG streams)
    recent_losses: jax.Array  # float32 [W]: losses of recent applied updates (NaN = empty), for spike skipping


def split_model(model: Transformer):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


def cross_entropy(logits_BSV, targets_BS, weights_BS):
    """Sum of token cross-entropies and sum of weights (float32)."""
    logits_BSV = logits_BSV.astype(jnp.float32)
    one_hot = jax.nn.one_hot(targets_BS, logits_BSV.shape[-1], dtype=jnp.float32)
    nll_BS = jax.nn.logsumexp(logits_BSV, axis=-1) - jnp.sum(logits_BSV * one_hot, axis=-1)
    return jnp.sum(nll_BS * weights_BS), jnp.sum(weights_BS)


def symmetric_kl(logits1_BSV, logits2_BSV, weights_BS):
    """Weighted mean over tokens of (KL(p1 || p2) + KL(p2 || p1)) / 2, in float32."""
    logp1 = jax.nn.log_softmax(logits1_BSV.astype(jnp.float32), axis=-1)
    logp2 = jax.nn.log_softmax(logits2_BSV.astype(jnp.float32), axis=-1)
    kl_BS = 0.5 * jnp.sum((jnp.exp(logp1) - jnp.exp(logp2)) * (logp1 - logp2), axis=-1)
    return jnp.sum(kl_BS * weights_BS) / jnp.maximum(jnp.sum(weights_BS), 1.0)


def _micro_step(graphdef, params, model_state, batch):
    """Loss and gradients of one micro-batch; returns the model's updated RNG state too.

    nnx.value_and_grad (not jax's) so that RNG streams advanced inside the loss (random routing,
    router jitter) come out as new state.
    """
    model = nnx.merge(graphdef, params, model_state)

    weights = batch.get("weights")
    if weights is None:
        weights = jnp.ones(batch["targets"].shape, jnp.float32)
    consistency = model.cfg.thor_consistency

    def loss_fn(model):
        logits, aux = model(batch["inputs"])
        nll_sum, count = cross_entropy(logits, batch["targets"], weights)
        ce = nll_sum / jnp.maximum(count, 1.0)
        if not consistency:
            return ce + aux["router_loss"], (ce, aux)
        # THOR: a second pass draws other experts; the loss is the mean of both passes' cross
        # entropies plus the weighted symmetric KL between their predictions
        logits2, aux2 = model(batch["inputs"])
        nll_sum2, _ = cross_entropy(logits2, batch["targets"], weights)
        ce = 0.5 * (ce + nll_sum2 / jnp.maximum(count, 1.0))
        aux = jax.tree.map(lambda a, b: 0.5 * (a + b), aux, aux2)
        kl = symmetric_kl(logits, logits2, weights)
        aux["thor_consistency"] = kl
        return ce + aux["router_loss"] + consistency * kl, (ce, aux)

    (total, (ce, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    return total, ce, aux, grads, nnx.state(model, nnx.Not(nnx.Param))


def make_train_step(
    graphdef, tx: optax.GradientTransformation, schedule, grad_accum_steps: int, spike_sigma: float = 0.0
):
    """The jitted-once step. An update whose loss or gradient norm is not finite, or (with
    ``spike_sigma`` > 0) whose loss is a spike over the recent window, is skipped: parameters and
    optimizer state stay as they were, and the metrics say so."""

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        # "stop": each process's rows carry its own preemption flag; the global max is what every
        # process reads back, so all of them stop after the same step
        batch = dict(batch)
        stop = batch.pop("stop", None)
        # a copy: the model built from state.model_state writes its updates (loss_free's bias)
        # into those same Variables, and a skipped step must be able to go back to them
        old_model_state = jax.tree.map(lambda x: x, state.model_state)
        if grad_accum_steps == 1:
            total, ce, aux, grads, model_state = _micro_step(graphdef, state.params, state.model_state, batch)
        else:
            # [B,...] -> [B/M, M, ...] -> [M, B/M, ...]: micro-batch i takes rows i, M+i, 2M+i, ...
            # so that every micro-batch stays spread over the batch axes (no resharding).
            def split(x):
                m = grad_accum_steps
                return jnp.swapaxes(x.reshape(x.shape[0] // m, m, *x.shape[1:]), 0, 1)

            micro = jax.tree.map(split, batch)

            def body(carry, mb):  # params ride in the carry: NNX graphs must not close over outer traces
                grads_acc, model_state, params = carry
                total, ce, aux, grads, model_state = _micro_step(graphdef, params, model_state, mb)
                grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
                return (grads_acc, model_state, params), (total, ce, aux)

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            carry = (zeros, state.model_state, state.params)
            (grads, model_state, _), (totals, ces, auxes) = jax.lax.scan(body, carry, micro)
            grads = jax.tree.map(lambda g: g / grad_accum_steps, grads)
            total, ce = jnp.mean(totals), jnp.mean(ces)
            aux = jax.tree.map(lambda a: jnp.mean(a, axis=0), auxes)
        # router state that learns from the load (loss_free's bias) moves once per step, from the
        # whole step's load: with accumulation, the mean over the micro-batches
        model = nnx.merge(graphdef, state.params, model_state)
        model.update_router_state(aux)
        model_state = nnx.state(model, nnx.Not(nnx.Param))
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
        window = state.recent_losses
        ok = finite
        if spike_sigma > 0:
            valid = jnp.isfinite(window)
            n = jnp.sum(valid)
            mean = jnp.sum(jnp.where(valid, window, 0.0)) / jnp.maximum(n, 1)
            std = jnp.sqrt(jnp.sum(jnp.where(valid, (window - mean) ** 2, 0.0)) / jnp.maximum(n, 1))
            ok = ok & ~((n == window.shape[0]) & (ce > mean + spike_sigma * std))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jnp.where(ok, new, old)  # noqa: E731 - skip = keep the old state
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        # and so does the model state the step moved: loss_free's bias, the RNG streams' counts.
        # RNG key arrays never change (a stream advances by its count) and jnp.where takes none.
        model_state = jax.tree.map(
            lambda new, old: new if jax.dtypes.issubdtype(new.dtype, jax.dtypes.prng_key) else keep(new, old),
            model_state, old_model_state,
        )
        window = jnp.where(ok, window.at[state.step % window.shape[0]].set(ce), window)
        metrics = {
            "loss": ce,
            "total_loss": total,
            "grad_norm": grad_norm,
            "skipped": (~ok).astype(jnp.int32),
            "nonfinite": (~finite).astype(jnp.int32),
            "learning_rate": schedule(state.step),
            "moe/aux_loss": aux["aux_loss"],
            "moe/z_loss": aux["z_loss"],
            "moe/router_loss": aux["router_loss"],
            "moe/dropped_fraction": aux["dropped_fraction"],
            "moe/expert_load": aux["expert_load"],
            "moe/router_entropy": aux["router_entropy"],
            "moe/load_imbalance": aux["load_imbalance"],
        }
        if stop is not None:
            metrics["stop"] = jnp.max(stop)
        if "thor_consistency" in aux:
            metrics["thor/consistency"] = aux["thor_consistency"]
        for layer, stats in aux["per_layer"].items():
            metrics.update({f"moe/{layer}/{name}": value for name, value in stats.items()})
        return TrainState(state.step + 1, params, opt_state, model_state, window), metrics

    return train_step


def make_eval_step(eval_graphdef):
    """eval_step(params, model_state, batch) -> sums for a token-weighted mean over many batches."""

    def eval_step(params, model_state, batch):
        model = nnx.merge(eval_graphdef, params, model_state)
        logits, aux = model(batch["inputs"])
        nll_sum, count = cross_entropy(logits, batch["targets"], batch["weights"])
        return {"nll_sum": nll_sum, "tokens": count, "moe/dropped_fraction": aux["dropped_fraction"]}

    return eval_step


def shardings_of(tree):
    """The NamedSharding of every array (or abstract array) in ``tree``."""
    return jax.tree.map(lambda x: x.sharding if hasattr(x, "sharding") else jax.typeof(x).sharding, tree)
