"""Capacity dispatch: every expert has C slots per group; assignments past them are dropped.

Shape letters: see ``moe/__init__.py`` (local to one device, inside ``shard_map``); here also
U tokens per capacity group and A = K*U assignments per group.

Per group, assignments are ordered token by token (a token's first choice, then its second;
``priority="token"``, the default) or choice-major (every first choice, then every second:
GShard's ``priority="choice"``), stably sorted by expert, and the first C of each expert get a
slot; the rest are dropped, contribute exactly zero, and are counted. With token order an
earlier token's slots depend only on earlier tokens: the causal language model needs that.

Stages (each under ``jax.named_scope``): ``permute`` (tokens into a static slot buffer
[E, G*C, D]), ``exchange`` (one all_to_all over ``expert``: each device gets its L experts'
slots from all M devices, [L, M*G*C, D]), ``experts`` (one batched FFN), ``exchange_back``,
``unpermute`` (a gather back to the assignments; the gates combine them). The largest
intermediate is the slot buffer: no [tokens, experts, capacity] tensor is built.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moe.dispatch.base import DispatchPlan, LocalRoute, combine, exchange, move_rows, psum_stat


class SlotLayout(NamedTuple):
    """Where every assignment goes in the [E*G*C] slot buffer, from both sides."""

    src_token_X1: jax.Array  # the token each slot reads
    src_choice_X1: jax.Array  # and which of its choices
    valid_X1: jax.Array  # whether the slot holds an assignment
    slot_TK: jax.Array  # each assignment's slot
    keep_TK: jax.Array  # whether it got one
    dropped: jax.Array  # overflowed assignments on this device


def _ranks(ids_GA: jax.Array, num_experts: int):
    """Stable sort of each group's assignments by expert.

    Returns order_GA (assignment index at each sorted position), counts_GE, starts_GE (first
    sorted position of each expert) and rank_GA (position of each assignment within its expert).
    """
    groups, assignments = ids_GA.shape
    order_GA = jnp.argsort(ids_GA, axis=-1, stable=True)
    counts_GE = jnp.sum(jax.nn.one_hot(ids_GA, num_experts, dtype=jnp.int32), axis=1)
    starts_GE = jnp.cumsum(counts_GE, axis=-1) - counts_GE
    sorted_ids_GA = jnp.minimum(jnp.take_along_axis(ids_GA, order_GA, axis=-1), num_experts - 1)
    rank_sorted_GA = jnp.arange(assignments)[None, :] - jnp.take_along_axis(starts_GE, sorted_ids_GA, axis=-1)
    rows_G1 = jnp.arange(groups)[:, None]
    rank_GA = jnp.zeros_like(rank_sorted_GA).at[rows_G1, order_GA].set(rank_sorted_GA)
    return order_GA, counts_GE, starts_GE, rank_GA


def slot_layout(ids_BSK: jax.Array, plan: DispatchPlan) -> SlotLayout:
    """Slot (e, g, c) of the [E, G*C] buffer takes the c-th assignment of expert e in group g."""
    b, s, k = ids_BSK.shape
    e, c, u = plan.num_experts, plan.capacity, plan.group_tokens
    t = b * s
    g, a = t // u, k * u
    if plan.priority == "token":  # assignment a = token * K + choice: earlier tokens first
        ids_GA = ids_BSK.reshape(g, a)

        def token_major(v_GA):
            return v_GA.reshape(t, k)

        def token_choice(a_GX):  # (token in the group, choice) of assignment a
            return a_GX // k, a_GX % k
    else:  # a = choice * U + token: every first choice before any second choice
        ids_GA = ids_BSK.reshape(g, u, k).transpose(0, 2, 1).reshape(g, a)

        def token_major(v_GA):
            return v_GA.reshape(g, k, u).transpose(0, 2, 1).reshape(t, k)

        def token_choice(a_GX):
            return a_GX % u, a_GX // u
    order_GA, counts_GE, starts_GE, rank_GA = _ranks(ids_GA, e)
    routed_GA = ids_GA < e  # id E: no expert (gshard's unused second choice); takes no slot
    keep_GA = (rank_GA < c) & routed_GA

    slot_C = jnp.arange(c)
    valid_GEC = slot_C[None, None, :] < counts_GE[:, :, None]
    pos_GX = jnp.clip(starts_GE[:, :, None] + slot_C[None, None, :], 0, a - 1).reshape(g, e * c)
    src_GX = jnp.take_along_axis(order_GA, pos_GX, axis=-1)  # assignment in the group
    src_token_GX, src_choice_GX = token_choice(src_GX)
    rows_G1 = jnp.arange(g)[:, None]
    src_token_X1 = (rows_G1 * u + src_token_GX).reshape(g, e, c).transpose(1, 0, 2).reshape(-1, 1)
    src_choice_X1 = src_choice_GX.reshape(g, e, c).transpose(1, 0, 2).reshape(-1, 1)
    valid_X1 = valid_GEC.transpose(1, 0, 2).reshape(-1, 1)
    # ... and each assignment's slot in that buffer, as [T, K] (token-major)
    slot_GA = jnp.clip(ids_GA, 0, e - 1) * (g * c) + rows_G1 * c + jnp.clip(rank_GA, 0, c - 1)
    dropped = jnp.sum(routed_GA & ~keep_GA).astype(jnp.float32)
    return SlotLayout(src_token_X1, src_choice_X1, valid_X1, token_major(slot_GA), token_major(keep_GA), dropped)


def capacity_dispatch(x_BSD: jax.Array, route: LocalRoute, experts, plan: DispatchPlan):
    """Route this device's tokens through their experts (which may live on other devices).
    Returns (y_BSD, dropped) where ``dropped`` counts overflowed assignments over all devices."""
    b, s, d = x_BSD.shape
    k = route.ids_BSK.shape[-1]
    t = b * s
    with jax.named_scope("permute"):
        lay = slot_layout(route.ids_BSK, plan)
        buf_XD = move_rows(x_BSD.reshape(t, d), lay.src_token_X1, lay.valid_X1, lay.slot_TK, lay.keep_TK)
        buf_ECD = buf_XD.reshape(plan.num_experts, -1, d)
    with jax.named_scope("exchange"):
        buf_LCD = exchange(buf_ECD, plan, forward=True)
    with jax.named_scope("experts"):
        out_LCD = experts.batched(buf_LCD)
    with jax.named_scope("exchange_back"):
        out_ECD = exchange(out_LCD, plan, forward=False)
    with jax.named_scope("unpermute"):  # each kept assignment reads its slot back, gate-weighted
        assignment_X1 = lay.src_token_X1 * k + lay.src_choice_X1  # row of the [T*K] assignment layout
        y_AD = move_rows(out_ECD.reshape(-1, d), lay.slot_TK.reshape(-1, 1), lay.keep_TK.reshape(-1, 1),
                         assignment_X1, lay.valid_X1)
        weight_TK = jnp.where(lay.keep_TK, route.gates_BSK.reshape(t, k), 0.0)
        y_BSD = combine(y_AD.reshape(t, k, d), weight_TK, x_BSD.dtype).reshape(b, s, d)
    return y_BSD, psum_stat(lay.dropped, plan)
