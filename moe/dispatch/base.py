"""What every dispatch strategy shares: its static plan, row moves that transpose to gathers,
and the all_to_all exchanges over the ``expert`` mesh axis.

Shape letters: see ``moe/__init__.py`` (local to one device, inside ``shard_map``).

A dispatch strategy is a function ``dispatch(x_BSD, route, experts, plan) -> (y_BSD, dropped)``
run inside the layer's ``shard_map`` on one device's tokens: ``route`` holds this device's rows
of the routing (``LocalRoute``), ``experts`` runs this device's experts (``moe.experts.Experts``),
``dropped`` counts overflowed assignments over all devices. Strategies: ``capacity`` (fixed slots),
``dropless`` (grouped matmul), ``single`` (one expert for every token, THOR in training); the
benchmark's one-hot einsum dispatch plugs in the same way.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


@dataclasses.dataclass(frozen=True)
class DispatchPlan:
    """Static facts of one dispatch: sizes and the mesh axes the collectives run over."""

    num_experts: int  # E
    capacity: int  # C, slots per expert per group
    group_tokens: int  # tokens per capacity group
    expert_axis: str | None  # mesh axis for all_to_all; None when experts are not split
    expert_axis_size: int  # M
    stat_axes: tuple[str, ...]  # axes the batch is split over (for psum of counts)
    # order of a group's assignments for the slots: "token" (token by token, a token's choices in
    # order: causal) or "choice" (every first choice, then every second: GShard's)
    priority: str = "token"
    # dropless only: exchange with ragged_all_to_all (valid rows only; not on XLA:CPU) instead
    # of a dense all_to_all of the worst-case buffer
    ragged_exchange: bool = False


class LocalRoute(NamedTuple):
    """One device's rows of a ``Routing`` (inside ``shard_map``)."""

    ids_BSK: jax.Array  # int32 expert ids; E = none
    gates_BSK: jax.Array
    single_expert: jax.Array | None = None  # int32 scalar: every token to this expert (THOR)


# the name every exchanged buffer carries (``jax.ad_checkpoint.checkpoint_name``); the remat
# policies "save_exchange" and "save_dots_exchange" keep these values for the backward pass
EXCHANGED = "moe_exchanged"


def psum_stat(value: jax.Array, plan: DispatchPlan) -> jax.Array:
    """A count summed over the devices that split the batch."""
    return jax.lax.psum(value, plan.stat_axes) if plan.stat_axes else value


def all_to_all(buf: jax.Array, axis: str) -> jax.Array:
    """A tiled all_to_all on dimension 0 whose result is named ``EXCHANGED`` (a remat policy can
    keep it, so that the backward pass does not repeat the exchange)."""
    return checkpoint_name(jax.lax.all_to_all(buf, axis, 0, 0, tiled=True), EXCHANGED)


def exchange(buf_ECD: jax.Array, plan: DispatchPlan, forward: bool) -> jax.Array:
    """all_to_all over the expert axis: [E, C', D] (all experts, my tokens) <-> [L, M*C', D]."""
    m = plan.expert_axis_size
    if plan.expert_axis is None or m == 1:
        return buf_ECD
    if forward:
        e, c, d = buf_ECD.shape
        buf_MLCD = all_to_all(buf_ECD.reshape(m, e // m, c, d), plan.expert_axis)
        return buf_MLCD.transpose(1, 0, 2, 3).reshape(e // m, m * c, d)
    el, mc, d = buf_ECD.shape
    buf_MLCD = buf_ECD.reshape(el, m, mc // m, d).transpose(1, 0, 2, 3)
    buf_MLCD = all_to_all(buf_MLCD, plan.expert_axis)
    return buf_MLCD.reshape(el * m, mc // m, d)


@jax.custom_vjp
def move_rows(v_RD, src_QJ, ok_QJ, back_RJ, back_ok_RJ):
    """out[q] = sum_j ok[q, j] * v[src[q, j]]: rows moved between two layouts by a gather.

    ``src``/``ok`` and ``back``/``back_ok`` describe one partial matching between the rows of
    ``v`` (R) and the output rows (Q) from both sides: output row q reads input row src[q, j],
    and input row r is read by output rows back[r, j'] (where back_ok). The transpose of the
    move is therefore the same move with the tables swapped, another gather: the backward
    pass never scatter-adds (slow on CPU and serialising on accelerators).
    """
    return _gather_rows(v_RD, src_QJ, ok_QJ)


def _gather_rows(v_RD, src_QJ, ok_QJ):
    rows_QJD = v_RD.at[src_QJ].get(mode="promise_in_bounds")
    rows_QJD = jnp.where(ok_QJ[..., None], rows_QJD, jnp.zeros((), v_RD.dtype))
    return rows_QJD[:, 0] if rows_QJD.shape[1] == 1 else jnp.sum(rows_QJD, axis=1)


def _move_rows_fwd(v_RD, src_QJ, ok_QJ, back_RJ, back_ok_RJ):
    return _gather_rows(v_RD, src_QJ, ok_QJ), (src_QJ, ok_QJ, back_RJ, back_ok_RJ)


def _move_rows_bwd(tables, g_QD):
    src_QJ, ok_QJ, back_RJ, back_ok_RJ = tables
    return move_rows(g_QD, back_RJ, back_ok_RJ, src_QJ, ok_QJ), None, None, None, None


move_rows.defvjp(_move_rows_fwd, _move_rows_bwd)


def combine(y_TKD: jax.Array, weight_TK: jax.Array, dtype) -> jax.Array:
    """sum_k weight[t, k] * y[t, k] in float32, cast to ``dtype``: [T, D]."""
    return jnp.einsum("tkd,tk->td", y_TKD.astype(jnp.float32), weight_TK.astype(jnp.float32)).astype(dtype)
