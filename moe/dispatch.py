"""Capacity dispatch: permute tokens into per-expert slots, all_to_all out and back, combine.

Shape letters (all local to one device, inside ``shard_map``): B batch, S sequence, D width,
T tokens (B*S), K experts per token, E experts (global), El experts on this device,
G capacity groups on this device, Tg tokens per group, A assignments per group (K*Tg),
C slots per expert per group, N devices along the ``expert`` axis.

Per group, assignments are ordered choice-major (every token's first choice, then every
second choice), stably sorted by expert, and the first C of each expert get a slot; the rest
are dropped, contribute exactly zero, and are counted. Slots fill a static buffer [E, G*C, D];
one all_to_all over ``expert`` gives each device its El experts' slots from all N devices,
[El, N*G*C, D]; one batched FFN; the reverse all_to_all; a gather un-permutes and the gates
combine. The largest intermediate is the slot buffer: no [tokens, experts, capacity] tensor.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """Static facts of one dispatch: sizes and the mesh axes the collectives run over."""

    num_experts: int  # E
    capacity: int  # C, slots per expert per group
    group_tokens: int  # Tg
    expert_axis: str | None  # mesh axis for all_to_all; None when experts are not split
    expert_axis_size: int  # N
    stat_axes: tuple[str, ...]  # axes the batch is split over (for psum of counts)


def _ranks(ids_GA: jax.Array, num_experts: int):
    """Stable sort of each group's assignments by expert.

    Returns order_GA (assignment index at each sorted position), counts_GE, starts_GE (first
    sorted position of each expert) and rank_GA (position of each assignment within its expert).
    """
    groups, assignments = ids_GA.shape
    order_GA = jnp.argsort(ids_GA, axis=-1, stable=True)
    counts_GE = jnp.sum(jax.nn.one_hot(ids_GA, num_experts, dtype=jnp.int32), axis=1)
    starts_GE = jnp.cumsum(counts_GE, axis=-1) - counts_GE
    sorted_ids_GA = jnp.take_along_axis(ids_GA, order_GA, axis=-1)
    rank_sorted_GA = jnp.arange(assignments)[None, :] - jnp.take_along_axis(starts_GE, sorted_ids_GA, axis=-1)
    rows_G1 = jnp.arange(groups)[:, None]
    rank_GA = jnp.zeros_like(rank_sorted_GA).at[rows_G1, order_GA].set(rank_sorted_GA)
    return order_GA, counts_GE, starts_GE, rank_GA


def exchange(buf_ECD: jax.Array, plan: DispatchPlan, forward: bool) -> jax.Array:
    """all_to_all over the expert axis: [E, C', D] (all experts, my tokens) <-> [El, N*C', D]."""
    n = plan.expert_axis_size
    if plan.expert_axis is None or n == 1:
        return buf_ECD
    if forward:
        e, c, d = buf_ECD.shape
        buf_NLCD = buf_ECD.reshape(n, e // n, c, d)
        buf_NLCD = jax.lax.all_to_all(buf_NLCD, plan.expert_axis, 0, 0, tiled=True)
        return buf_NLCD.transpose(1, 0, 2, 3).reshape(e // n, n * c, d)
    el, nc, d = buf_ECD.shape
    buf_NLCD = buf_ECD.reshape(el, n, nc // n, d).transpose(1, 0, 2, 3)
    buf_NLCD = jax.lax.all_to_all(buf_NLCD, plan.expert_axis, 0, 0, tiled=True)
    return buf_NLCD.reshape(el * n, nc // n, d)


def dispatch_combine(
    x_BSD: jax.Array,
    ids_BSK: jax.Array,
    gates_BSK: jax.Array,
    experts: Callable[[jax.Array], jax.Array],
    plan: DispatchPlan,
):
    """Route local tokens through their experts (which may live on other devices).

    ``experts`` maps [El, slots, D] -> [El, slots, D] for this device's experts.
    Returns (y_BSD, dropped) where ``dropped`` counts overflowed assignments over all devices.
    """
    b, s, d = x_BSD.shape
    k = ids_BSK.shape[-1]
    e, c, tg = plan.num_experts, plan.capacity, plan.group_tokens
    g = (b * s) // tg
    a = k * tg
    x_TD = x_BSD.reshape(b * s, d)
    # assignment index within a group: a = choice * Tg + token (top-1 choices first)
    ids_GA = ids_BSK.reshape(g, tg, k).transpose(0, 2, 1).reshape(g, a)
    gates_GA = gates_BSK.reshape(g, tg, k).transpose(0, 2, 1).reshape(g, a)
    order_GA, counts_GE, starts_GE, rank_GA = _ranks(ids_GA, e)
    keep_GA = rank_GA < c

    # permute: slot (g, e, c) takes the c-th assignment of expert e in group g, if any
    slot_C = jnp.arange(c)
    pos_GEC = starts_GE[:, :, None] + slot_C
    valid_GEC = slot_C < counts_GE[:, :, None]
    pos_GX = jnp.clip(pos_GEC, 0, a - 1).reshape(g, e * c)
    assignment_GX = jnp.take_along_axis(order_GA, pos_GX, axis=-1)
    token_GX = jnp.arange(g)[:, None] * tg + assignment_GX % tg
    buf_GECD = jnp.where(valid_GEC[..., None], x_TD[token_GX].reshape(g, e, c, d), 0)
    buf_ECD = buf_GECD.transpose(1, 0, 2, 3).reshape(e, g * c, d)

    out_ECD = exchange(experts(exchange(buf_ECD, plan, forward=True)), plan, forward=False)

    # un-permute: each kept assignment reads its slot back; dropped ones read zero
    out_GXD = out_ECD.reshape(e, g, c, d).transpose(1, 0, 2, 3).reshape(g, e * c, d)
    slot_GA = jnp.clip(ids_GA * c + rank_GA, 0, e * c - 1)
    y_GAD = jnp.take_along_axis(out_GXD, slot_GA[..., None], axis=1)
    weight_GA = jnp.where(keep_GA, gates_GA, 0.0).astype(jnp.float32)
    y_GKTD = (y_GAD.astype(jnp.float32) * weight_GA[..., None]).reshape(g, k, tg, d)
    y_BSD = jnp.sum(y_GKTD, axis=1).reshape(b, s, d).astype(x_BSD.dtype)

    dropped = jnp.sum(~keep_GA).astype(jnp.float32)
    if plan.stat_axes:
        dropped = jax.lax.psum(dropped, plan.stat_axes)
    return y_BSD, dropped
