"""The Optax chain: global-norm clipping, then AdamW with linear warm-up and cosine decay.

Weight decay applies by meaning (``moe.params.decays``): to weight matrices and tensors
(embeddings, projections, experts, routers' weights), never to norm scales, biases or the stable
router's distilled table, whether the layers are scanned or not.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from moe.params import decays

from train.core.config import OptimizerConfig


def make_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=cfg.learning_rate * cfg.min_lr_ratio,
    )


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(cfg, total_steps)
    # Clipping is always in the chain (infinite norm = off) so that the optimizer state has one
    # structure whatever the setting, and a resumed run may change it.
    parts = [optax.clip_by_global_norm(cfg.grad_clip_norm if cfg.grad_clip_norm > 0 else float("inf"))]
    parts.append(
        optax.adamw(
            learning_rate=schedule,
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=decay_mask,
        )
    )
    return optax.chain(*parts), schedule


def decay_mask(params):
    """A tree like ``params`` (``nnx.Variable`` leaves): True where weight decay applies."""
    return jax.tree.map(lambda var: jax.tree.map(lambda _: decays(var), var), params,
                        is_leaf=lambda x: isinstance(x, nnx.Variable))
