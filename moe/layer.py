"""MoEFeedForward: a router, a dispatch strategy and the experts, returning (y, stats).

Shape letters: see ``moe/__init__.py``.

Stages, each under ``jax.named_scope`` (so a profile shows them): ``route`` (the router, on
global arrays), then inside one ``jax.shard_map`` over the whole mesh the dispatch strategy's
``permute``, ``exchange``, ``experts``, ``exchange_back`` and ``unpermute`` (``moe.dispatch``).
With no mesh set the very same functions run on one device.

Parameters (global arrays, created already sharded under the current mesh):
  router/...                   the router's own (``moe.routers``: ``w`` [D,E], ``bias``, ``table``)
  wi [E,D,F], wg [E,D,F] (gated only), wo [E,F,D]   (E over ``expert``, F over ``tensor``)
  bi [E,F], bg [E,F], bo [E,D]                      (``ffn_bias`` only: each expert's biases)
"""

from __future__ import annotations

import copy

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe.config import FFNConfig, MoEConfig
from moe.dispatch import DISPATCH, DispatchPlan, LocalRoute, single_dispatch
from moe.experts import Experts
from moe.params import compute_value, sharded_param, spec_of
from moe.routers import RouteInput, Routing, make_router
from moe.routers.base import ACT_AXES, ROUTE_AXES
from moe.stats import LayerStats, load_imbalance
from sharding.mesh import axis_size, current_mesh
from sharding.rules import logical_to_spec, mesh_axis_of

EXPERT_IN_AXES = ("experts", "expert_embed", "expert_mlp")
EXPERT_OUT_AXES = ("experts", "expert_mlp", "expert_embed")
EXPERT_BIAS_AXES = (("experts", "expert_mlp"), ("experts", "expert_mlp"), ("experts", "expert_embed"))  # bi, bg, bo


class MoEFeedForward(nnx.Module):
    """Sparse MoE FFN. ``y, stats = layer(x_BSD, token_ids_BS)``.

    ``stats`` (``moe.stats.LayerStats``): the router losses with their coefficients and their sum
    ``router_loss`` (ready to add to the training loss), ``dropped_fraction``, ``router_entropy``
    and ``expert_load`` [E], all over the global batch, and each token's ``first_expert`` [B,S]
    (E where none took it). ``layer.eval()`` switches off router
    jitter, fixes the random routers' draws (THOR routes per token then), and uses
    ``eval_capacity_factor``; ``layer.train()`` switches back.
    """

    def __init__(self, cfg: MoEConfig, ffn: FFNConfig, *, rngs: nnx.Rngs, layer: int = 0, vocab_size: int = 0):
        """``layer`` seeds the router's fixed evaluation draws; ``vocab_size``: the token ids a
        table router (balanced_hash) covers."""
        if not isinstance(cfg, MoEConfig) or not isinstance(ffn, FFNConfig):
            raise TypeError("MoEFeedForward expects a MoEConfig and an FFNConfig")
        cfg = copy.deepcopy(cfg).check()  # later edits of the caller's config change nothing here
        ffn.check()
        mesh = current_mesh()
        ep_axis, tp_axis = mesh_axis_of("experts", mesh), mesh_axis_of("expert_mlp", mesh)
        n_ep, n_tp = axis_size(mesh, ep_axis), axis_size(mesh, tp_axis)
        if cfg.num_experts % n_ep:
            raise ValueError(
                f"MoEConfig.num_experts={cfg.num_experts}: not divisible by the '{ep_axis}' mesh axis (size {n_ep})"
            )
        if ffn.d_ff % n_tp:
            raise ValueError(f"FFNConfig.d_ff={ffn.d_ff}: not divisible by the '{tp_axis}' mesh axis (size {n_tp})")
        self.cfg, self.ffn = cfg, ffn
        self.deterministic = False
        d, f, e = ffn.d_model, ffn.d_ff, cfg.num_experts
        pdtype = jnp.dtype(ffn.param_dtype)
        k_router, k_wi, k_wg, k_wo = jax.random.split(rngs.params(), 4)
        self.router = make_router(cfg, d, key=k_router, rngs=rngs, eval_seed=layer, vocab_size=vocab_size)
        self.wi = sharded_param(k_wi, (e, d, f), EXPERT_IN_AXES, d**-0.5, pdtype)
        if ffn.gated:
            self.wg = sharded_param(k_wg, (e, d, f), EXPERT_IN_AXES, d**-0.5, pdtype)
        self.wo = sharded_param(k_wo, (e, f, d), EXPERT_OUT_AXES, f**-0.5, pdtype)
        if ffn.ffn_bias:
            bias = lambda width, axes: sharded_param(None, (e, width), axes, 0.0, pdtype, init="zeros", decay=False)  # noqa: E731
            self.bi = bias(f, EXPERT_BIAS_AXES[0])
            self.bg = bias(f, EXPERT_BIAS_AXES[1]) if ffn.gated else nnx.data(None)
            self.bo = bias(d, EXPERT_BIAS_AXES[2])
        else:
            self.bi = self.bg = self.bo = nnx.data(None)

    # ------------------------------------------------------------------ the stages
    def route(self, x_BSD, token_ids_BS=None, key=None, positions_BS=None, prev_token_ids_BS=None,
              group_tokens: int | None = None, layer=None) -> Routing:
        """Routing decisions for a batch (global arrays; layout-invariant).

        ``positions_BS`` (default 0..S-1 per row) only matter to the random routers;
        ``prev_token_ids_BS`` (default: ``token_ids`` shifted right, as for rows that start a
        sequence) only to ``bigram_hash``; ``group_tokens`` (default: the capacity group of
        this batch on the current mesh) only to ``expert_choice``; ``layer`` (default: the index
        given at construction) keys the fixed evaluation draws, and may be traced (scanned blocks).
        """
        if positions_BS is None:
            b, s = x_BSD.shape[:2]
            positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
            if current_mesh() is not None:
                positions_BS = jax.sharding.reshard(positions_BS, spec_of(("batch", "seq")))
        group = group_tokens or self.plan(x_BSD).group_tokens
        return self.router(RouteInput(x_BSD, token_ids_BS, positions_BS, prev_token_ids_BS, key, group, layer))

    def plan(self, x_BSD: jax.Array, no_drops: bool = False) -> DispatchPlan:
        """Sizes and mesh axes of this batch's dispatch: tokens per capacity group and slots.

        When nothing can be dropped (eval without ``eval_capacity_factor``, dropless dispatch,
        ``no_drops``) the group size changes nothing and the group is all local tokens, so any
        ``capacity_group_size`` evaluates and generates."""
        cfg, mesh = self.cfg, current_mesh()
        b_spec = logical_to_spec(("batch",), mesh)[0]
        b_axes = () if b_spec is None else (b_spec,) if isinstance(b_spec, str) else tuple(b_spec)
        n_batch = 1
        for a in b_axes:
            n_batch *= mesh.shape[a]
        b, s, _ = x_BSD.shape
        if b % n_batch:
            raise ValueError(f"MoEFeedForward: batch size {b} is not divisible by the {n_batch} batch shards {b_axes}")
        local_tokens = (b // n_batch) * s
        group = local_tokens
        if not no_drops and (self.router.ranks_group or cfg.can_drop(self.deterministic)):
            group = cfg.capacity_group_size or local_tokens
            if local_tokens % group:
                raise ValueError(
                    f"MoEConfig.capacity_group_size={cfg.capacity_group_size}: must divide the {local_tokens} tokens "
                    "per device"
                )
        capacity = group if no_drops else self.router.capacity(group, self.deterministic)
        ep_axis = mesh_axis_of("experts", mesh)
        return DispatchPlan(
            num_experts=cfg.num_experts, capacity=capacity, group_tokens=group, expert_axis=ep_axis,
            expert_axis_size=axis_size(mesh, ep_axis), stat_axes=b_axes, priority=cfg.capacity_priority,
            ragged_exchange=cfg.ragged_exchange,
        )

    def __call__(self, x_BSD, token_ids_BS=None, *, key=None, positions_BS=None, prev_token_ids_BS=None,
                 no_drops: bool = False, dispatch=None, layer=None):
        """``no_drops``: every assignment gets a slot whatever the capacity factor (cached decoding,
        where a step holds one token per sequence and a capacity budget would mean nothing).
        ``dispatch``: another strategy with the signature of ``moe.dispatch.capacity_dispatch``
        (how benchmarks run other formulations on the same parameters). ``layer``: see ``route``."""
        cfg = self.cfg
        if x_BSD.ndim != 3 or x_BSD.shape[-1] != self.ffn.d_model:
            raise ValueError(f"MoEFeedForward: x must be [batch, seq, {self.ffn.d_model}], got shape {x_BSD.shape}")
        x_BSD = x_BSD.astype(jnp.dtype(self.ffn.dtype))
        plan = self.plan(x_BSD, no_drops)
        with jax.named_scope("route"):
            r = self.route(x_BSD, token_ids_BS, key, positions_BS, prev_token_ids_BS, plan.group_tokens, layer)
        if r.single_expert is not None:
            y_BSD, dropped = self._sharded(single_dispatch, plan, x_BSD, expert=r.single_expert)
        else:
            y_BSD, dropped = self._sharded(dispatch or DISPATCH[cfg.dispatch], plan, x_BSD, r.expert_ids, r.gates)
        return y_BSD, self._statistics(r, dropped)

    def update_router_state(self, expert_load_E: jax.Array) -> None:
        """Once per training step, after the gradients: router state that learns from the step's
        global load (``loss_free``: the bias moves by +-gamma toward equal load). With gradient
        accumulation ``expert_load_E`` is the whole step's load (the mean over its micro-batches),
        so the state moves once per step whatever the number of micro-batches."""
        self.router.update(expert_load_E)

    # ------------------------------------------------------------------ helpers
    def _sharded(self, dispatch, plan, x_BSD, ids_BSK=None, gates_BSK=None, expert=None):
        """``dispatch`` over the whole mesh (returning y [B,S,D] and a replicated scalar), or plainly."""
        mesh = current_mesh()
        tp_axis = mesh_axis_of("expert_mlp", mesh)
        gated, ffn = self.ffn.gated, self.ffn
        weights = (
            compute_value(self.wi, EXPERT_IN_AXES),
            compute_value(self.wo, EXPERT_OUT_AXES),
            compute_value(self.wg, EXPERT_IN_AXES) if gated else None,
        )
        biased = (self.bi, self.bg, self.bo)
        biases = tuple(None if b is None else compute_value(b, axes) for b, axes in zip(biased, EXPERT_BIAS_AXES))
        single = expert is not None
        route_args = (expert,) if single else (ids_BSK, gates_BSK)

        def body(x, *args):
            route = LocalRoute(None, None, args[0]) if single else LocalRoute(args[0], args[1])
            wi, wo, wg, bi, bg, bo = args[len(route_args):]
            experts = Experts(wi, wo, wg, ffn.activation, tp_axis, self.cfg.grouped_matmul,
                              None if bi is None else (bi, bg, bo), ffn.swiglu_limit, ffn.swiglu_alpha)
            return dispatch(x, route, experts, plan)

        args = (x_BSD, *route_args, *weights, *biases)
        if mesh is None:
            return body(*args)
        w_in, w_out = (logical_to_spec(a, mesh, compute=True) for a in (EXPERT_IN_AXES, EXPERT_OUT_AXES))
        b_specs = tuple(None if b is None else logical_to_spec(axes, mesh, compute=True)
                        for b, axes in zip(biases, EXPERT_BIAS_AXES))
        route_specs = (P(),) if single else (logical_to_spec(ROUTE_AXES, mesh),) * 2
        act_spec = logical_to_spec(ACT_AXES, mesh)
        in_specs = (act_spec, *route_specs, w_in, w_out, w_in if gated else None, *b_specs)
        # Explicit-mode shard_map needs its inputs in exactly in_specs: reshard (a no-op when they already are)
        args = tuple(a if p is None else jax.sharding.reshard(a, p) for a, p in zip(args, in_specs, strict=True))
        # a Pallas grouped-matmul kernel declares no varying mesh axes for its output, which
        # shard_map's check would demand (the oracle tests check the gradients without it)
        check_vma = self.cfg.dispatch != "dropless" or single or self.cfg.grouped_matmul in ("auto", "ragged_dot")
        y_BSD, stat = jax.shard_map(body, in_specs=in_specs, out_specs=(act_spec, P()), check_vma=check_vma)(*args)
        if jax.typeof(y_BSD).sharding.spec != jax.typeof(x_BSD).sharding.spec:
            y_BSD = jax.sharding.reshard(y_BSD, jax.typeof(x_BSD).sharding.spec)
        return y_BSD, stat

    def _statistics(self, r: Routing, dropped: jax.Array) -> LayerStats:
        cfg = self.cfg
        # id E (gshard's unused second choice, expert_choice's untaken slot) is not an assignment
        total = jnp.maximum(jnp.sum(r.expert_ids < cfg.num_experts), 1).astype(jnp.float32)
        aux_loss, z_loss = cfg.aux_loss_coef * r.aux_loss, cfg.z_loss_coef * r.z_loss  # with their coefficients
        router_loss = aux_loss + z_loss if r.own_loss is None else aux_loss + z_loss + r.own_loss
        return LayerStats(
            aux_loss=aux_loss,
            z_loss=z_loss,
            router_loss=router_loss,
            # a router's own drops (expert_choice: experts never overflow; the tokens no expert took)
            dropped_fraction=dropped / total if r.dropped_fraction is None else r.dropped_fraction,
            router_entropy=r.router_entropy,
            expert_load=r.expert_load,
            load_imbalance=load_imbalance(r.expert_load),
            first_expert=r.expert_ids[..., 0],
        )
