"""Capacity dispatch: permute tokens into per-expert slots, all_to_all out and back, combine.

Shape letters (all local to one device, inside ``shard_map``): B batch, S sequence, D width,
T tokens (B*S), K experts per token, E experts (global), El experts on this device,
G capacity groups on this device, Tg tokens per group, A assignments per group (K*Tg),
C slots per expert per group, N devices along the ``expert`` axis.

Per group, assignments are ordered token by token (a token's first choice, then its second;
``priority="token"``, the default) or choice-major (every first choice, then every second:
GShard's ``priority="choice"``), stably sorted by expert, and the first C of each expert get a
slot; the rest are dropped, contribute exactly zero, and are counted. With token order an
earlier token's slots depend only on earlier tokens: the causal language model needs that. Slots fill a static buffer [E, G*C, D];
one all_to_all over ``expert`` gives each device its El experts' slots from all N devices,
[El, N*G*C, D]; one batched FFN; the reverse all_to_all; a gather un-permutes and the gates
combine. The largest intermediate is the slot buffer: no [tokens, experts, capacity] tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

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
    # order of a group's assignments for the slots: "token" (token by token, a token's choices in
    # order: causal) or "choice" (every first choice, then every second: GShard's)
    priority: str = "token"
    # dropless only: exchange with ragged_all_to_all (valid rows only; not on XLA:CPU) instead
    # of a dense all_to_all of the worst-case buffer
    ragged_exchange: bool = False


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


@jax.custom_vjp
def move_rows(v_RD, src_MJ, ok_MJ, back_RJ, back_ok_RJ):
    """out[m] = sum_j ok[m, j] * v[src[m, j]]: rows moved between two layouts by a gather.

    ``src``/``ok`` and ``back``/``back_ok`` describe one partial matching between the rows of
    ``v`` (R) and the output rows (M) from both sides: output row m reads input row src[m, j],
    and input row r is read by output rows back[r, j'] (where back_ok). The transpose of the
    move is therefore the same move with the tables swapped, another gather: the backward
    pass never scatter-adds (slow on CPU and serialising on accelerators).
    """
    return _gather_rows(v_RD, src_MJ, ok_MJ)


def _gather_rows(v_RD, src_MJ, ok_MJ):
    rows_MJD = v_RD.at[src_MJ].get(mode="promise_in_bounds")
    rows_MJD = jnp.where(ok_MJ[..., None], rows_MJD, jnp.zeros((), v_RD.dtype))
    return rows_MJD[:, 0] if rows_MJD.shape[1] == 1 else jnp.sum(rows_MJD, axis=1)


def _move_rows_fwd(v_RD, src_MJ, ok_MJ, back_RJ, back_ok_RJ):
    return _gather_rows(v_RD, src_MJ, ok_MJ), (src_MJ, ok_MJ, back_RJ, back_ok_RJ)


def _move_rows_bwd(tables, g_MD):
    src_MJ, ok_MJ, back_RJ, back_ok_RJ = tables
    return move_rows(g_MD, back_RJ, back_ok_RJ, src_MJ, ok_MJ), None, None, None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


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
    t = b * s
    g = t // tg
    a = k * tg
    if plan.priority == "token":  # assignment a = token * K + choice: earlier tokens first
        ids_GA = ids_BSK.reshape(g, a)

        def token_major(v_GA):
            return v_GA.reshape(t, k)

        def token_choice(a_GX):  # (token in the group, choice) of assignment a
            return a_GX // k, a_GX % k
    else:  # a = choice * Tg + token: every first choice before any second choice
        ids_GA = ids_BSK.reshape(g, tg, k).transpose(0, 2, 1).reshape(g, a)

        def token_major(v_GA):
            return v_GA.reshape(g, k, tg).transpose(0, 2, 1).reshape(t, k)

        def token_choice(a_GX):
            return a_GX % tg, a_GX // tg
    order_GA, counts_GE, starts_GE, rank_GA = _ranks(ids_GA, e)
    routed_GA = ids_GA < e  # id E: no expert (gshard's unused second choice); takes no slot
    keep_GA = (rank_GA < c) & routed_GA

    # Slot (e, g, c) of the [E, G*C] buffer takes the c-th assignment of expert e in group g.
    slot_C = jnp.arange(c)
    valid_GEC = slot_C < counts_GE[:, :, None]
    pos_GX = jnp.clip(starts_GE[:, :, None] + slot_C, 0, a - 1).reshape(g, e * c)
    src_GX = jnp.take_along_axis(order_GA, pos_GX, axis=-1)  # assignment in the group
    src_token_GX, src_choice_GX = token_choice(src_GX)
    rows_G1 = jnp.arange(g)[:, None]
    src_token_X = (rows_G1 * tg + src_token_GX).reshape(g, e, c).transpose(1, 0, 2).reshape(-1, 1)
    src_choice_X = src_choice_GX.reshape(g, e, c).transpose(1, 0, 2).reshape(-1, 1)
    valid_X = valid_GEC.transpose(1, 0, 2).reshape(-1, 1)
    # ... and each assignment's slot in that buffer, as [T, K] (token-major)
    slot_GA = jnp.clip(ids_GA, 0, e - 1) * (g * c) + rows_G1 * c + jnp.clip(rank_GA, 0, c - 1)
    slot_TK, keep_TK = token_major(slot_GA), token_major(keep_GA)

    x_TD = x_BSD.reshape(t, d)
    buf_XD = move_rows(x_TD, src_token_X, valid_X, slot_TK, keep_TK)
    buf_ECD = buf_XD.reshape(e, g * c, d)
    out_ECD = exchange(experts(exchange(buf_ECD, plan, forward=True)), plan, forward=False)

    # combine: each kept assignment reads its slot back (dropped ones read zero), gate-weighted
    assignment_X = src_token_X * k + src_choice_X  # row of the [T*K] assignment layout
    y_AD = move_rows(out_ECD.reshape(-1, d), slot_TK.reshape(-1, 1), keep_TK.reshape(-1, 1), assignment_X, valid_X)
    weight_TK = jnp.where(keep_TK, gates_BSK.reshape(t, k), 0.0).astype(jnp.float32)
    y_TD = jnp.einsum("tkd,tk->td", y_AD.reshape(t, k, d).astype(jnp.float32), weight_TK)
    y_BSD = y_TD.reshape(b, s, d).astype(x_BSD.dtype)

    dropped = jnp.sum(routed_GA & ~keep_GA).astype(jnp.float32)
    if plan.stat_axes:
        dropped = jax.lax.psum(dropped, plan.stat_axes)
    return y_BSD, dropped


def _exchange_rows(buf_NRD, counts_N, recv_counts_N, plan: DispatchPlan) -> jax.Array:
    """Chunk m of [N, R, D] (its first counts[m] rows valid) goes to device m; returns [N, R, D]
    whose chunk n came from device n (first recv_counts[n] rows valid; the rest zero or junk).

    Dense ``all_to_all`` of the whole worst-case buffer (XLA:CPU), or ``ragged_all_to_all``
    sending only the valid rows (GPU/TPU), into the same fixed-offset layout.
    """
    n, r, d = buf_NRD.shape
    if plan.expert_axis is None or n == 1:
        return buf_NRD
    if not plan.ragged_exchange:
        return jax.lax.all_to_all(buf_NRD, plan.expert_axis, 0, 0, tiled=True)
    offsets_N = jnp.arange(n, dtype=jnp.int32) * r
    me = jax.lax.axis_index(plan.expert_axis).astype(jnp.int32)
    out = jax.lax.ragged_all_to_all(
        buf_NRD.reshape(n * r, d), jnp.zeros_like(buf_NRD.reshape(n * r, d)),
        offsets_N, counts_N.astype(jnp.int32), jnp.full((n,), me * r, jnp.int32), recv_counts_N.astype(jnp.int32),
        axis_name=plan.expert_axis,
    )
    return out.reshape(n, r, d)


def dropless_dispatch_combine(
    x_BSD: jax.Array,
    ids_BSK: jax.Array,
    gates_BSK: jax.Array,
    experts: Callable[[jax.Array, jax.Array], jax.Array],
    plan: DispatchPlan,
):
    """Every assignment reaches its expert: no capacity, nothing dropped.

    Extra shape letters: A assignments on this device (T*K, token-major), L experts per device
    (El), R = N*A rows of the receive buffer.

    Assignments are sorted by expert (hence by device, then local expert) and laid into a
    worst-case send buffer [N, A, D] (chunk m: the rows for device m, valid ones first). After
    the exchange, chunk n holds what device n sent, ordered by local expert; the rows are
    regrouped expert-major into [R, D] and ``experts(rows_RD, group_sizes_L)`` runs one grouped
    matmul (``jax.lax.ragged_dot``). Everything goes back the same way. Every move is a gather
    with a gather as its transpose (``move_rows``).
    """
    b, s, d = x_BSD.shape
    k = ids_BSK.shape[-1]
    e, n = plan.num_experts, plan.expert_axis_size
    el, t = e // n, b * s
    a = t * k
    ids_A = ids_BSK.reshape(a)
    order_A = jnp.argsort(ids_A, stable=True)
    counts_NL = jnp.sum(jax.nn.one_hot(ids_A, e, dtype=jnp.int32), axis=0).reshape(n, el)
    dev_counts_N = jnp.sum(counts_NL, axis=1)
    dev_starts_N = jnp.cumsum(dev_counts_N) - dev_counts_N

    # send buffer: slot (m, i) holds sorted assignment dev_starts[m] + i, valid for i < dev_counts[m]
    i_A = jnp.arange(a)
    valid_X = (i_A[None, :] < dev_counts_N[:, None]).reshape(-1, 1)
    src_X = order_A[jnp.clip(dev_starts_N[:, None] + i_A[None, :], 0, a - 1)].reshape(-1, 1)
    sorted_pos_A = jnp.zeros((a,), jnp.int32).at[order_A].set(i_A.astype(jnp.int32))
    dev_A = jnp.minimum(ids_A // el, n - 1)
    slot_A = jnp.clip(dev_A * a + sorted_pos_A - dev_starts_N[dev_A], 0, n * a - 1).reshape(-1, 1)
    routed_A = (ids_A < e).reshape(-1, 1)  # id E: no expert (gshard's unused second choice)
    buf_XD = move_rows(x_BSD.reshape(t, d), src_X // k, valid_X, slot_A.reshape(t, k), routed_A.reshape(t, k))

    # exchange rows and counts; chunk n of the receive buffer came from device n
    if plan.expert_axis is None or n == 1:
        recv_counts_NL = counts_NL
    else:
        recv_counts_NL = jax.lax.all_to_all(counts_NL, plan.expert_axis, 0, 0, tiled=True)
    recv_totals_N = jnp.sum(recv_counts_NL, axis=1)
    recv_NAD = _exchange_rows(buf_XD.reshape(n, a, d), dev_counts_N, recv_totals_N, plan)

    # regroup expert-major: row (n, i) of local expert l goes to
    # group_starts[l] + (rows of expert l from devices before n) + (i - chunk start of l in n)
    group_sizes_L = jnp.sum(recv_counts_NL, axis=0)
    group_starts_L = jnp.cumsum(group_sizes_L) - group_sizes_L
    before_NL = jnp.cumsum(recv_counts_NL, axis=0) - recv_counts_NL
    chunk_ends_NL = jnp.cumsum(recv_counts_NL, axis=1)
    expert_NA = jnp.sum(i_A[None, :, None] >= chunk_ends_NL[:, None, :], axis=-1)
    valid_recv_NA = i_A[None, :] < recv_totals_N[:, None]
    expert_NA = jnp.minimum(expert_NA, el - 1)
    rows_N1 = jnp.arange(n)[:, None]
    chunk_starts_NA = jnp.take_along_axis(chunk_ends_NL - recv_counts_NL, expert_NA, axis=1)
    dest_NA = group_starts_L[expert_NA] + before_NL[rows_N1, expert_NA] + i_A[None, :] - chunk_starts_NA
    r = n * a
    dest_R = jnp.where(valid_recv_NA, dest_NA, r).reshape(r)
    src_R = jnp.zeros((r,), jnp.int32).at[dest_R].set(jnp.arange(r, dtype=jnp.int32), mode="drop")
    valid_R = (jnp.arange(r) < jnp.sum(group_sizes_L)).reshape(r, 1)
    dest_R1, valid_recv_R1, src_R1 = jnp.minimum(dest_R, r - 1)[:, None], valid_recv_NA.reshape(r, 1), src_R[:, None]
    grouped_RD = move_rows(recv_NAD.reshape(r, d), src_R1, valid_R, dest_R1, valid_recv_R1)
    out_RD = experts(grouped_RD, group_sizes_L)
    back_NAD = move_rows(out_RD, dest_R1, valid_recv_R1, src_R1, valid_R).reshape(n, a, d)
    home_NAD = _exchange_rows(back_NAD, recv_totals_N, dev_counts_N, plan)

    # combine: assignment (t, k) reads its send slot back and is weighted by its gate
    y_AD = move_rows(home_NAD.reshape(r, d), slot_A, routed_A, src_X, valid_X)
    y_TD = jnp.einsum("tkd,tk->td", y_AD.reshape(t, k, d).astype(jnp.float32), gates_BSK.reshape(t, k).astype(jnp.float32))
    return y_TD.reshape(b, s, d).astype(x_BSD.dtype), jnp.zeros((), jnp.float32)
