"""Pure train and eval steps over (graphdef, state) pytrees, jitted once with explicit shardings.

Shape letters: B batch (global sequences), M micro-batches, S sequence, V vocabulary.

``TrainState`` holds everything a step changes: the step counter, the parameters, the
optimizer state, the model's other state (RNG counters of random routers, router state such as
loss_free's bias) and the recent losses. ``train_step(state, batch, stop) -> (state, metrics)``
is three parts: ``accumulate_grads`` (M micro-batches under ``lax.scan``), ``guarded_update``
(one optimizer update, skipped when non-finite or a spike) and ``step_metrics``. ``stop``
([B, 1], each process's rows carrying its own preemption flag) is reduced to one flag every
process reads back. The step is jitted with the state's own shardings in and out and the state
donated.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe.stats import MoEStats
from moe.transformer import Transformer


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: jax.Array  # int32 scalar
    params: Any  # nnx.State of Params
    opt_state: Any
    model_state: Any  # nnx.State of everything else (RNG streams, router state)
    recent_losses: jax.Array  # float32 [W]: losses of recent applied updates (NaN = empty), for spike skipping


def split_model(model: Transformer):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, params, rest


# ---------------------------------------------------------------- losses
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


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossParts:
    """What a loss function reports besides its total: the mean cross-entropy, the model's MoE
    statistics, and any further objective's value by its metric name (``<router>/consistency``)."""

    ce: jax.Array
    moe: MoEStats
    extra: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


LossFn = Callable[[Transformer, dict], tuple[jax.Array, LossParts]]


def _forward(model: Transformer, batch: dict, weights=None):
    """One forward pass: (logits, MoE statistics, mean cross-entropy, token weights)."""
    if weights is None:
        weights = batch.get("weights")
    if weights is None:
        weights = jnp.ones(batch["targets"].shape, jnp.float32)
    logits, stats = model(batch["inputs"])
    nll_sum, count = cross_entropy(logits, batch["targets"], weights)
    return logits, stats, nll_sum / jnp.maximum(count, 1.0), weights


def lm_loss(model: Transformer, batch: dict):
    """Mean cross-entropy plus the router losses: (total, ``LossParts``)."""
    _, stats, ce, _ = _forward(model, batch)
    return ce + stats.router_loss, LossParts(ce, stats)


def consistency_loss(alpha: float, metric: str = "consistency") -> LossFn:
    """The consistency objective a router may ask for (``Router.consistency_weight``; THOR's): two forward
    passes draw their experts independently; the loss is the mean of both cross-entropies plus ``alpha``
    times the symmetric KL between their predictions, logged as ``metric``."""

    def loss(model: Transformer, batch: dict):
        logits, stats, ce1, weights = _forward(model, batch)
        logits2, stats2, ce2, _ = _forward(model, batch, weights)
        ce = 0.5 * (ce1 + ce2)
        stats = jax.tree.map(lambda a, b: 0.5 * (a + b), stats, stats2)
        kl = symmetric_kl(logits, logits2, weights)
        return ce + stats.router_loss + alpha * kl, LossParts(ce, stats, {metric: kl})

    return loss


def loss_for(model_cfg) -> LossFn:
    """The training objective the model config asks for."""
    if not model_cfg.moe_every:
        return lm_loss
    router = model_cfg.moe.router_class  # a router may ask for a consistency objective (THOR)
    alpha = router.consistency_weight(model_cfg.moe)
    return consistency_loss(alpha, f"{router.name}/consistency") if alpha else lm_loss


# ---------------------------------------------------------------- the parts of a step
def _micro_step(graphdef, params, model_state, batch, loss_fn: LossFn):
    """Loss and gradients of one micro-batch, and the model's state after it.

    nnx.value_and_grad (not jax's) so that RNG streams advanced inside the loss (random routing,
    router jitter) come out as new state.
    """
    model = nnx.merge(graphdef, params, model_state)
    (total, parts), grads = nnx.value_and_grad(lambda m: loss_fn(m, batch), has_aux=True)(model)
    return total, parts, grads, nnx.state(model, nnx.Not(nnx.Param))


def accumulate_grads(graphdef, params, model_state, batch, loss_fn: LossFn, micro_batches: int):
    """(mean total loss, mean ``LossParts``, gradients, the model state after the last micro-batch),
    over ``micro_batches`` micro-batches. Micro-batch i takes rows i, M+i, 2M+i, ... so that every
    micro-batch stays spread over the batch axes (no resharding)."""
    if micro_batches == 1:
        return _micro_step(graphdef, params, model_state, batch, loss_fn)

    def split(x):  # [B,...] -> [B/M, M, ...] -> [M, B/M, ...]
        return jnp.swapaxes(x.reshape(x.shape[0] // micro_batches, micro_batches, *x.shape[1:]), 0, 1)

    def body(carry, mb):  # params ride in the carry: NNX graphs must not close over outer traces
        grads_acc, model_state, params = carry
        total, parts, grads, model_state = _micro_step(graphdef, params, model_state, mb, loss_fn)
        grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
        return (grads_acc, model_state, params), (total, parts)

    carry = (jax.tree.map(jnp.zeros_like, params), model_state, params)
    (grads, model_state, _), (totals, parts) = jax.lax.scan(body, carry, jax.tree.map(split, batch))
    grads = jax.tree.map(lambda g: g / micro_batches, grads)
    return jnp.mean(totals), jax.tree.map(lambda a: jnp.mean(a, axis=0), parts), grads, model_state


def update_router_state(graphdef, params, model_state, stats: MoEStats):
    """Router state that learns from the load (loss_free's bias) moves once per step, from the
    whole step's load (with accumulation, the mean over the micro-batches)."""
    model = nnx.merge(graphdef, params, model_state)
    model.update_router_state(stats)
    return nnx.state(model, nnx.Not(nnx.Param))


def is_spike(ce, window, spike_sigma: float):
    """Whether ``ce`` exceeds the mean of a full window of recent losses by ``spike_sigma`` std."""
    valid = jnp.isfinite(window)
    n = jnp.sum(valid)
    mean = jnp.sum(jnp.where(valid, window, 0.0)) / jnp.maximum(n, 1)
    std = jnp.sqrt(jnp.sum(jnp.where(valid, (window - mean) ** 2, 0.0)) / jnp.maximum(n, 1))
    return (n == window.shape[0]) & (ce > mean + spike_sigma * std)


def guarded_update(state: TrainState, grads, total, ce, model_state, old_model_state, tx, spike_sigma: float,
                   spread=None):
    """One optimizer update, skipped (parameters, optimizer and model state kept) when the loss or
    gradient norm is not finite or (``spike_sigma`` > 0) the loss is a spike. ``spread``: the
    PartitionSpecs (a tree like the parameters) of the optimizer moments when they are split
    further than the parameters (``optimizer.sharded_state``). Returns the new state and (ok,
    finite, grad_norm)."""
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    window = state.recent_losses
    ok = finite
    if spike_sigma > 0:
        ok = ok & ~is_spike(ce, window, spike_sigma)
    if spread is None:
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
    else:  # ZeRO-1: the update on each device's slice of every parameter, then gathered back
        grads, params = jax.sharding.reshard(grads, spread), jax.sharding.reshard(state.params, spread)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        params = optax.apply_updates(params, updates)
        params = jax.tree.map(lambda new, old: jax.sharding.reshard(new, jax.typeof(old).sharding.spec), params, state.params)
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
    return TrainState(state.step + 1, params, opt_state, model_state, window), (ok, finite, grad_norm)


def step_metrics(parts: LossParts, total, ok, finite, grad_norm, learning_rate, stop) -> dict:
    """The metrics row of a step: losses, the update's fate, further objectives, and the MoE
    statistics (global, and per MoE layer as ``moe/layer<i>/<name>``)."""
    return {
        "loss": parts.ce,
        "total_loss": total,
        "grad_norm": grad_norm,
        "skipped": (~ok).astype(jnp.int32),
        "nonfinite": (~finite).astype(jnp.int32),
        "learning_rate": learning_rate,
        **parts.moe.metrics(),
        "stop": jnp.max(stop),
        **parts.extra,
    }


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, grad_accum_steps: int,
                    spike_sigma: float = 0.0, loss_fn: LossFn = lm_loss, spread=None):
    """``train_step(state, batch, stop) -> (state, metrics)``, to be jitted once; ``spread``: see
    ``guarded_update``."""

    def train_step(state: TrainState, batch: dict, stop: jax.Array) -> tuple[TrainState, dict]:
        # a copy: the model built from state.model_state writes its updates (loss_free's bias)
        # into those same Variables, and a skipped step must be able to go back to them
        old_model_state = jax.tree.map(lambda x: x, state.model_state)
        total, parts, grads, model_state = accumulate_grads(
            graphdef, state.params, state.model_state, batch, loss_fn, grad_accum_steps
        )
        model_state = update_router_state(graphdef, state.params, model_state, parts.moe)
        new_state, (ok, finite, grad_norm) = guarded_update(
            state, grads, total, parts.ce, model_state, old_model_state, tx, spike_sigma, spread
        )
        return new_state, step_metrics(parts, total, ok, finite, grad_norm, schedule(state.step), stop)

    return train_step


# ---------------------------------------------------------------- evaluation
def make_eval_step(eval_graphdef):
    """eval_step(params, model_state, batch) -> sums for a token-weighted mean over many batches."""

    def eval_step(params, model_state, batch):
        model = nnx.merge(eval_graphdef, params, model_state)
        logits, stats = model(batch["inputs"])
        nll_sum, count = cross_entropy(logits, batch["targets"], batch["weights"])
        return {"nll_sum": nll_sum, "tokens": count, "moe/dropped_fraction": stats.dropped_fraction}

    return eval_step


def make_probe_step(probe_graphdef):
    """probe_step(params, model_state, inputs) -> {"layer<i>": [B,S] first expert per token}: the
    router telemetry's forward pass (``train.services.telemetry``), in evaluation mode."""

    def probe_step(params, model_state, inputs):
        return nnx.merge(probe_graphdef, params, model_state).routes(inputs)

    return probe_step


def score(eval_step, params, model_state, batches, to_global, num_bytes: int, num_tokens: int) -> dict:
    """Token-weighted mean loss over ``batches``; perplexity and bits per byte (the scored text has
    ``num_bytes`` bytes in ``num_tokens`` tokens)."""
    nll = tokens = 0.0
    for local in batches:
        out = eval_step(params, model_state, to_global(local))
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    loss = nll / max(tokens, 1.0)
    bytes_per_token = num_bytes / max(num_tokens, 1)
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": loss / math.log(2) / bytes_per_token,
        "tokens": int(tokens),
    }


def shardings_of(tree):
    """The NamedSharding of every array (or abstract array) in ``tree``."""
    return jax.tree.map(lambda x: x.sharding if hasattr(x, "sharding") else jax.typeof(x).sharding, tree)


def shardings_on(tree, mesh):
    """The shardings of ``tree``'s (abstract) arrays, their specs placed on the concrete ``mesh``."""
    return jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s.spec), shardings_of(tree))
