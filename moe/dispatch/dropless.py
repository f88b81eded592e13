"""Dropless dispatch: every assignment reaches its expert, whatever the load; nothing is dropped.

Shape letters: see ``moe/__init__.py`` (local to one device, inside ``shard_map``); here A are
the T*K assignments of this device (token-major) and R = M*A rows of the receive buffer.

``permute``: assignments are sorted by expert (hence by device, then local expert) and laid
into a worst-case send buffer [M, A, D] (chunk m: the rows for device m, valid ones first).
``exchange``: chunk m goes to device m (a dense all_to_all of the whole buffer, or with
``plan.ragged_exchange`` a ``ragged_all_to_all`` of the valid rows only, GPU/TPU), with the
per-expert counts. ``experts``: the received rows are regrouped expert-major into [R, D] and run
through one grouped matmul (``Experts.grouped``, ``jax.lax.ragged_dot``). ``exchange_back`` and
``unpermute`` go back the same way. Every move is a gather whose transpose is a gather.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moe.dispatch.base import EXCHANGED, DispatchPlan, LocalRoute, all_to_all, combine, move_rows


class SendLayout(NamedTuple):
    """Assignments -> the [M*A] send buffer, from both sides."""

    src_X1: jax.Array  # the assignment each send row holds
    valid_X1: jax.Array
    slot_A1: jax.Array  # each assignment's send row
    routed_A1: jax.Array  # id E (gshard's unused second choice) is no assignment
    counts_ML: jax.Array  # assignments per destination device and its local expert
    dev_counts_M: jax.Array


class RecvLayout(NamedTuple):
    """Received rows [M*A] <-> expert-major rows [R], from both sides."""

    src_R1: jax.Array
    valid_R1: jax.Array
    dest_R1: jax.Array
    valid_recv_R1: jax.Array
    group_sizes_L: jax.Array
    recv_totals_M: jax.Array


def _send_layout(ids_A: jax.Array, plan: DispatchPlan) -> SendLayout:
    e, m = plan.num_experts, plan.expert_axis_size
    el, a = e // m, ids_A.shape[0]
    order_A = jnp.argsort(ids_A, stable=True)
    counts_ML = jnp.sum(jax.nn.one_hot(ids_A, e, dtype=jnp.int32), axis=0).reshape(m, el)
    dev_counts_M = jnp.sum(counts_ML, axis=1)
    dev_starts_M = jnp.cumsum(dev_counts_M) - dev_counts_M
    # send row (m, i) holds sorted assignment dev_starts[m] + i, valid for i < dev_counts[m]
    i_A = jnp.arange(a)
    valid_X1 = (i_A[None, :] < dev_counts_M[:, None]).reshape(-1, 1)
    src_X1 = order_A[jnp.clip(dev_starts_M[:, None] + i_A[None, :], 0, a - 1)].reshape(-1, 1)
    sorted_pos_A = jnp.zeros((a,), jnp.int32).at[order_A].set(i_A.astype(jnp.int32))
    dev_A = jnp.minimum(ids_A // el, m - 1)
    slot_A1 = jnp.clip(dev_A * a + sorted_pos_A - dev_starts_M[dev_A], 0, m * a - 1).reshape(-1, 1)
    routed_A1 = (ids_A < e).reshape(-1, 1)
    return SendLayout(src_X1, valid_X1, slot_A1, routed_A1, counts_ML, dev_counts_M)


def _recv_layout(recv_counts_ML: jax.Array, a: int) -> RecvLayout:
    """Row (m, i) of local expert l goes to group_starts[l] + (rows of expert l from devices
    before m) + (i - chunk start of l in m)."""
    m, el = recv_counts_ML.shape
    i_A = jnp.arange(a)
    recv_totals_M = jnp.sum(recv_counts_ML, axis=1)
    group_sizes_L = jnp.sum(recv_counts_ML, axis=0)
    group_starts_L = jnp.cumsum(group_sizes_L) - group_sizes_L
    before_ML = jnp.cumsum(recv_counts_ML, axis=0) - recv_counts_ML
    chunk_ends_ML = jnp.cumsum(recv_counts_ML, axis=1)
    expert_MA = jnp.sum(i_A[None, :, None] >= chunk_ends_ML[:, None, :], axis=-1)
    valid_recv_MA = i_A[None, :] < recv_totals_M[:, None]
    expert_MA = jnp.minimum(expert_MA, el - 1)
    rows_M1 = jnp.arange(m)[:, None]
    chunk_starts_MA = jnp.take_along_axis(chunk_ends_ML - recv_counts_ML, expert_MA, axis=1)
    dest_MA = group_starts_L[expert_MA] + before_ML[rows_M1, expert_MA] + i_A[None, :] - chunk_starts_MA
    r = m * a
    dest_R = jnp.where(valid_recv_MA, dest_MA, r).reshape(r)
    src_R = jnp.zeros((r,), jnp.int32).at[dest_R].set(jnp.arange(r, dtype=jnp.int32), mode="drop")
    valid_R1 = (jnp.arange(r) < jnp.sum(group_sizes_L)).reshape(r, 1)
    return RecvLayout(src_R[:, None], valid_R1, jnp.minimum(dest_R, r - 1)[:, None], valid_recv_MA.reshape(r, 1),
                      group_sizes_L, recv_totals_M)


def _exchange_rows(buf_MAD, counts_M, recv_counts_M, plan: DispatchPlan) -> jax.Array:
    """Chunk m of [M, A, D] (its first counts[m] rows valid) goes to device m; returns [M, A, D]
    whose chunk n came from device n (first recv_counts[n] rows valid; the rest zero or junk)."""
    m, a, d = buf_MAD.shape
    if plan.expert_axis is None or m == 1:
        return buf_MAD
    if not plan.ragged_exchange:
        return all_to_all(buf_MAD, plan.expert_axis)
    offsets_M = jnp.arange(m, dtype=jnp.int32) * a
    me = jax.lax.axis_index(plan.expert_axis).astype(jnp.int32)
    out = jax.lax.ragged_all_to_all(
        buf_MAD.reshape(m * a, d), jnp.zeros_like(buf_MAD.reshape(m * a, d)),
        offsets_M, counts_M.astype(jnp.int32), jnp.full((m,), me * a, jnp.int32), recv_counts_M.astype(jnp.int32),
        axis_name=plan.expert_axis,
    )
    return checkpoint_name(out, EXCHANGED).reshape(m, a, d)


def dropless_dispatch(x_BSD: jax.Array, route: LocalRoute, experts, plan: DispatchPlan):
    """Every assignment reaches its expert: (y_BSD, 0 dropped)."""
    b, s, d = x_BSD.shape
    k = route.ids_BSK.shape[-1]
    m, t = plan.expert_axis_size, b * s
    a = t * k
    with jax.named_scope("permute"):
        send = _send_layout(route.ids_BSK.reshape(a), plan)
        buf_XD = move_rows(x_BSD.reshape(t, d), send.src_X1 // k, send.valid_X1, send.slot_A1.reshape(t, k),
                           send.routed_A1.reshape(t, k))
    with jax.named_scope("exchange"):  # chunk n of the receive buffer came from device n
        if plan.expert_axis is None or m == 1:
            recv_counts_ML = send.counts_ML
        else:
            recv_counts_ML = all_to_all(send.counts_ML, plan.expert_axis)
        recv = _recv_layout(recv_counts_ML, a)
        recv_MAD = _exchange_rows(buf_XD.reshape(m, a, d), send.dev_counts_M, recv.recv_totals_M, plan)
    with jax.named_scope("experts"):
        grouped_RD = move_rows(recv_MAD.reshape(m * a, d), recv.src_R1, recv.valid_R1, recv.dest_R1, recv.valid_recv_R1)
        out_RD = experts.grouped(grouped_RD, recv.group_sizes_L)
        back_MAD = move_rows(out_RD, recv.dest_R1, recv.valid_recv_R1, recv.src_R1, recv.valid_R1).reshape(m, a, d)
    with jax.named_scope("exchange_back"):
        home_MAD = _exchange_rows(back_MAD, recv.recv_totals_M, send.dev_counts_M, plan)
    with jax.named_scope("unpermute"):  # assignment (t, k) reads its send row back, weighted by its gate
        y_AD = move_rows(home_MAD.reshape(m * a, d), send.slot_A1, send.routed_A1, send.src_X1, send.valid_X1)
        y_BSD = combine(y_AD.reshape(t, k, d), route.gates_BSK.reshape(t, k), x_BSD.dtype).reshape(b, s, d)
    return y_BSD, jnp.zeros((), jnp.float32)
