"""MoEFeedForward: routing + capacity dispatch + batched experts, returning (y, aux).

Shape letters: B batch, S sequence, D model width, H expert hidden width, E experts,
K experts per token.

Parameters (global arrays, created already sharded under the current mesh):
  router_w [D,E]    (learned routers only; replicated, kept in float32)
  wi [E,D,H], wg [E,D,H] (gated only), wo [E,H,D]   (E over ``expert``, H over ``tensor``)
The routed computation runs inside one ``jax.shard_map`` over the whole mesh; with no mesh
set the very same function runs on one device.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from moe import routing
from moe.config import LEARNED_ROUTERS, MoEConfig
from moe.dispatch import DispatchPlan, dispatch_combine, dropless_dispatch_combine
from moe.experts import expert_ffn, grouped_expert_ffn
from sharding.mesh import axis_size, current_mesh
from sharding.rules import logical_to_spec, mesh_axis_of

EXPERT_IN_AXES = ("experts", "expert_embed", "expert_mlp")
EXPERT_OUT_AXES = ("experts", "expert_mlp", "expert_embed")
ROUTER_AXES = ("router_in", "router_out")
ACT_AXES = ("batch", "seq", "act_embed")
ROUTE_AXES = ("batch", "seq", None)


class RouterState(nnx.Variable):
    """Router state that is not trained by gradients (frozen router weights): saved in checkpoints
    with the model, never seen by the optimizer."""


def sharded_param(
    key, shape, logical_axes, std: float, dtype, mesh=None, init: str = "normal", kind: type = nnx.Param
) -> nnx.Variable:
    """A normal(0, std) (or ``init="ones"``) parameter created directly in its sharding
    (an ``nnx.Param`` unless ``kind`` says otherwise).

    The value is born sharded by the current rules (no unsharded copy ever exists); the
    logical axis names are kept as metadata for the sharding table.
    """
    mesh = current_mesh() if mesh is None else mesh
    spec = None if mesh is None else logical_to_spec(logical_axes, mesh)
    if init == "ones":
        value = jnp.ones(shape, dtype, device=None if spec is None else jax.sharding.NamedSharding(mesh, spec))
    else:
        value = jax.random.normal(key, shape, dtype, out_sharding=spec) * jnp.asarray(std, dtype)
    meta = {} if spec is None else {"out_sharding": tuple(spec)}
    return kind(value, logical_axes=tuple(logical_axes), **meta)


def compute_value(param: nnx.Param, logical_axes) -> jax.Array:
    """The parameter gathered to its compute sharding (a no-op unless it is FSDP-sharded)."""
    value = param[...]
    mesh = current_mesh()
    if mesh is None:
        return value
    spec = logical_to_spec(logical_axes, mesh, compute=True)
    if jax.typeof(value).sharding.spec != spec:
        value = jax.sharding.reshard(value, spec)
    return value


def ragged_exchange_supported() -> bool:
    """Whether the dropless dispatch may use ``jax.lax.ragged_all_to_all`` (XLA:CPU lacks it).
    ``SWITCHYARD_RAGGED_EXCHANGE=0`` forces the dense worst-case exchange everywhere."""
    if os.environ.get("SWITCHYARD_RAGGED_EXCHANGE", "") == "0":
        return False
    return jax.default_backend() in ("gpu", "cuda", "rocm", "tpu")


class MoEFeedForward(nnx.Module):
    """Sparse MoE FFN. ``y, aux = layer(x_BSD, token_ids_BS)``.

    ``aux`` holds float32 scalars ``aux_loss`` (``aux_loss_coef * E * sum_i f_i P_i``) and
    ``z_loss`` (``z_loss_coef * mean logsumexp^2``), 0 where the router has none, ``router_loss``
    (their sum, ready to add to the training loss),
    ``dropped_fraction`` and ``router_entropy``, and ``expert_load`` [E]; all over the global batch.
    ``layer.eval()`` switches off router jitter, fixes the random routers' seed (THOR routes per
    token then), and uses ``eval_capacity_factor``; ``layer.train()`` switches back.
    """

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"MoEFeedForward expects a MoEConfig, got {type(cfg).__name__}")
        mesh = current_mesh()
        ep_axis, tp_axis = mesh_axis_of("experts", mesh), mesh_axis_of("expert_mlp", mesh)
        n_ep, n_tp = axis_size(mesh, ep_axis), axis_size(mesh, tp_axis)
        if cfg.num_experts % n_ep:
            raise ValueError(
                f"MoEConfig.num_experts={cfg.num_experts}: not divisible by the '{ep_axis}' mesh axis (size {n_ep})"
            )
        if cfg.d_ff % n_tp:
            raise ValueError(f"MoEConfig.d_ff={cfg.d_ff}: not divisible by the '{tp_axis}' mesh axis (size {n_tp})")
        self.cfg = cfg
        self.deterministic = False
        d, h, e = cfg.d_model, cfg.d_ff, cfg.num_experts
        pdtype = jnp.dtype(cfg.param_dtype)
        key = rngs.params()
        k_router, k_wi, k_wg, k_wo = jax.random.split(key, 4)
        if cfg.router in LEARNED_ROUTERS:  # "frozen": the same initial weights, never trained
            kind = RouterState if cfg.router == "frozen" else nnx.Param
            self.router_w = sharded_param(k_router, (d, e), ROUTER_AXES, 0.1 * d**-0.5, jnp.float32, kind=kind)
        self.wi = sharded_param(k_wi, (e, d, h), EXPERT_IN_AXES, d**-0.5, pdtype)
        if cfg.gated:
            self.wg = sharded_param(k_wg, (e, d, h), EXPERT_IN_AXES, d**-0.5, pdtype)
        self.wo = sharded_param(k_wo, (e, h, d), EXPERT_OUT_AXES, h**-0.5, pdtype)
        if cfg.router == "loss_free":  # selection bias, moved toward balance outside the gradient
            self.expert_bias = RouterState(jnp.zeros((e,), jnp.float32), logical_axes=(None,))
        if cfg.router == "balanced_hash":  # replaced by the training-set table before training
            table = routing.hash_table(cfg.vocab_size, e, cfg.experts_per_token, cfg.hash_seed)
            self.hash_table = RouterState(jnp.asarray(table), logical_axes=(None, None))
        stochastic = cfg.router in ("random", "gshard", "thor") or cfg.router_jitter > 0
        self.rngs = rngs["routing"].fork() if stochastic else nnx.data(None)

    # ------------------------------------------------------------------ routing
    def route(
        self,
        x_BSD: jax.Array,
        token_ids_BS: jax.Array | None,
        key: jax.Array | None = None,
        positions_BS: jax.Array | None = None,
        prev_token_ids_BS: jax.Array | None = None,
        group_tokens: int | None = None,
    ) -> routing.Routing:
        """Routing decisions for a batch (global arrays; layout-invariant).

        ``positions_BS`` (default 0..S-1 per row) only matter to the random routers;
        ``prev_token_ids_BS`` (default: ``token_ids`` shifted right, as for rows that start a
        sequence) only to ``bigram_hash``; ``group_tokens`` (default: the capacity group of
        this batch on the current mesh) only to ``expert_choice``.
        """
        cfg = self.cfg
        e, k = cfg.num_experts, cfg.experts_per_token
        mesh = current_mesh()
        if cfg.router in ("hash", "balanced_hash", "bigram_hash") and token_ids_BS is None:
            raise ValueError(f"MoEConfig.router={cfg.router!r}: the layer needs token_ids")
        if cfg.router == "hash":
            return routing.hash_route(token_ids_BS, e, k, cfg.hash_seed)
        if cfg.router == "balanced_hash":
            spec = None if mesh is None else logical_to_spec(ROUTE_AXES, mesh)
            return routing.table_route(self.hash_table[...], token_ids_BS, e, out_sharding=spec)
        if cfg.router == "bigram_hash":
            if prev_token_ids_BS is None:
                prev_token_ids_BS = routing.previous_tokens(token_ids_BS)
            return routing.bigram_hash_route(prev_token_ids_BS, token_ids_BS, e, k, cfg.hash_seed)
        if cfg.router in ("random", "gshard", "thor"):
            draw_key = key
            if draw_key is None:
                draw_key = jax.random.key(cfg.eval_seed) if self.deterministic else self.rngs()
            elif cfg.router == "gshard":
                key = jax.random.fold_in(key, 1)  # router jitter, below, must not reuse the draw's key
            if positions_BS is None:
                b, s = x_BSD.shape[:2]
                positions_BS = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
                if mesh is not None:
                    positions_BS = jax.sharding.reshard(positions_BS, logical_to_spec(("batch", "seq"), mesh))
            if cfg.router == "random" or (cfg.router == "thor" and self.deterministic):
                return routing.random_route(draw_key, positions_BS, e, k)
            if cfg.router == "thor":  # one expert for the whole batch
                return routing.single_expert_route(routing.thor_expert(draw_key, e), positions_BS, e)
        x32_BSD = x_BSD.astype(jnp.float32)
        if cfg.router_jitter > 0 and not self.deterministic:
            if key is None:
                key = self.rngs()
            spec = None if mesh is None else logical_to_spec(ACT_AXES, mesh)
            noise = jax.random.uniform(
                key, x32_BSD.shape, jnp.float32, 1.0 - cfg.router_jitter, 1.0 + cfg.router_jitter, out_sharding=spec
            )
            x32_BSD = x32_BSD * noise
        router_w = compute_value(self.router_w, ROUTER_AXES).astype(jnp.float32)
        if cfg.router == "frozen":
            router_w = jax.lax.stop_gradient(router_w)
        logits_BSE = jnp.einsum("bsd,de->bse", x32_BSD, router_w)
        if cfg.router == "gshard":
            return routing.gshard_route(logits_BSE, draw_key, positions_BS, cfg.gshard_threshold)
        if cfg.router == "expert_choice":
            group = group_tokens or self.layout(x_BSD)[1]
            specs = (None, None)
            if mesh is not None:  # [G, Tg, E] groups and [B, S, E] slots, both split like the batch
                specs = (logical_to_spec(("batch", None, None), mesh), logical_to_spec(ROUTE_AXES, mesh))
            return routing.expert_choice_route(logits_BSE, group, cfg.capacity(group, self.deterministic), *specs)
        if cfg.router == "loss_free":
            return routing.loss_free_route(logits_BSE, self.expert_bias[...], k)
        return routing.topk_route(logits_BSE, k)

    def update_router_state(self, expert_load_E: jax.Array) -> None:
        """Once per training step, after the gradients: router state that learns from the step's
        global load (``loss_free``: the bias moves by +-gamma toward equal load). With gradient
        accumulation ``expert_load_E`` is the whole step's load (the mean over its micro-batches),
        so the state moves once per step whatever the number of micro-batches."""
        if self.cfg.router == "loss_free":
            bias_E = self.expert_bias[...]
            self.expert_bias[...] = routing.loss_free_bias_update(bias_E, expert_load_E, self.cfg.loss_free_gamma)

    # ------------------------------------------------------------------ forward
    def __call__(
        self,
        x_BSD: jax.Array,
        token_ids_BS: jax.Array | None = None,
        *,
        key: jax.Array | None = None,
        positions_BS: jax.Array | None = None,
        prev_token_ids_BS: jax.Array | None = None,
        no_drops: bool = False,
    ):
        """``no_drops``: every assignment gets a slot whatever the capacity factor (cached decoding,
        where a step holds one token per sequence and a capacity budget would mean nothing)."""
        dispatch = dropless_dispatch_combine if self.cfg.dispatch == "dropless" else dispatch_combine
        return self.forward_with(
            dispatch, x_BSD, token_ids_BS, key=key, positions_BS=positions_BS, prev_token_ids_BS=prev_token_ids_BS,
            no_drops=no_drops,
        )

    def layout(self, x_BSD: jax.Array, no_drops: bool = False) -> tuple[tuple[str, ...], int]:
        """(mesh axes the batch is split over, tokens per capacity group) for this batch.

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
        if no_drops or not cfg.uses_capacity_groups(self.deterministic):
            return b_axes, local_tokens
        group = cfg.capacity_group_size or local_tokens
        if local_tokens % group:
            raise ValueError(
                f"MoEConfig.capacity_group_size={cfg.capacity_group_size}: must divide the {local_tokens} tokens per device"
            )
        return b_axes, group

    def forward_with(
        self, dispatch, x_BSD, token_ids_BS=None, *, key=None, positions_BS=None, prev_token_ids_BS=None, no_drops=False
    ):
        """The layer with ``dispatch`` (signature of ``moe.dispatch.dispatch_combine``) in place of
        the sort-based dispatch: how benchmarks run other formulations on the same parameters."""
        cfg = self.cfg
        if x_BSD.ndim != 3 or x_BSD.shape[-1] != cfg.d_model:
            raise ValueError(f"MoEFeedForward: x must be [batch, seq, {cfg.d_model}], got shape {x_BSD.shape}")
        x_BSD = x_BSD.astype(jnp.dtype(cfg.dtype))
        b_axes, group = self.layout(x_BSD, no_drops)
        r = self.route(x_BSD, token_ids_BS, key, positions_BS, prev_token_ids_BS, group)

        mesh = current_mesh()
        ep_axis, tp_axis = mesh_axis_of("experts", mesh), mesh_axis_of("expert_mlp", mesh)
        n_ep = axis_size(mesh, ep_axis)
        ffn_args = {"activation": cfg.activation, "tensor_axis": tp_axis}
        weights = (
            compute_value(self.wi, EXPERT_IN_AXES),
            compute_value(self.wo, EXPERT_OUT_AXES),
            compute_value(self.wg, EXPERT_IN_AXES) if cfg.gated else None,
        )
        weight_specs = (
            (None,) * 3
            if mesh is None
            else (
                logical_to_spec(EXPERT_IN_AXES, mesh, compute=True),
                logical_to_spec(EXPERT_OUT_AXES, mesh, compute=True),
                None if weights[2] is None else logical_to_spec(EXPERT_IN_AXES, mesh, compute=True),
            )
        )
        act_spec = None if mesh is None else logical_to_spec(ACT_AXES, mesh)

        def sharded(fn, args, in_specs):
            """fn over the whole mesh (returning y [B,S,D] and a replicated scalar), or plainly."""
            if mesh is None:
                return fn(*args)
            # Explicit-mode shard_map needs its inputs in exactly in_specs: reshard (a no-op
            # when they already are).
            args = tuple(a if p is None else jax.sharding.reshard(a, p) for a, p in zip(args, in_specs, strict=True))
            y_BSD, stat = jax.shard_map(fn, in_specs=in_specs, out_specs=(act_spec, P()))(*args)
            if jax.typeof(y_BSD).sharding.spec != jax.typeof(x_BSD).sharding.spec:
                y_BSD = jax.sharding.reshard(y_BSD, jax.typeof(x_BSD).sharding.spec)
            return y_BSD, stat

        if r.single_expert is not None:
            # One expert for every token (THOR in training). Nothing moves between devices but
            # that expert's weights (a psum over the expert axis); each device runs its own
            # tokens through them.
            def single(x, expert, wi, wo, wg):
                el = wi.shape[0]
                local = expert - (0 if n_ep == 1 else jax.lax.axis_index(ep_axis) * el)
                mine, i = (local >= 0) & (local < el), jnp.clip(local, 0, el - 1)
                picked = [None if w is None else jnp.where(mine, w[i], jnp.zeros((), w.dtype))[None] for w in (wi, wo, wg)]
                if n_ep > 1:
                    picked = [None if w is None else jax.lax.psum(w, ep_axis) for w in picked]
                b_, s_, d_ = x.shape
                y = expert_ffn(x.reshape(1, b_ * s_, d_), picked[0], picked[1], picked[2], **ffn_args)
                return y.reshape(b_, s_, d_), jnp.zeros((), jnp.float32)

            y_BSD, dropped = sharded(single, (x_BSD, r.single_expert, *weights), (act_spec, P(), *weight_specs))
        else:
            plan = DispatchPlan(
                num_experts=cfg.num_experts,
                capacity=group if no_drops else cfg.capacity(group, self.deterministic),
                group_tokens=group,
                priority=cfg.capacity_priority,
                expert_axis=ep_axis,
                expert_axis_size=n_ep,
                stat_axes=b_axes,
                ragged_exchange=ragged_exchange_supported(),
            )

            def local(x, ids, gates, wi, wo, wg):
                def experts(buf, group_sizes=None):
                    if group_sizes is None:
                        return expert_ffn(buf, wi, wo, wg, **ffn_args)
                    return grouped_expert_ffn(buf, group_sizes, wi, wo, wg, **ffn_args)

                return dispatch(x, ids, gates, experts, plan)

            route_spec = None if mesh is None else logical_to_spec(ROUTE_AXES, mesh)
            args = (x_BSD, r.expert_ids, r.gates, *weights)
            y_BSD, dropped = sharded(local, args, (act_spec, route_spec, route_spec, *weight_specs))

        # id E (gshard's unused second choice, expert_choice's untaken slot) is not an assignment
        total = jnp.maximum(jnp.sum(r.expert_ids < cfg.num_experts), 1).astype(jnp.float32)
        aux_loss, z_loss = cfg.aux_loss_coef * r.aux_loss, cfg.z_loss_coef * r.z_loss  # with their coefficients
        aux = {
            "aux_loss": aux_loss,
            "z_loss": z_loss,
            "router_loss": aux_loss + z_loss,
            # expert_choice: experts never overflow; the tokens no expert took are its drops
            "dropped_fraction": dropped / total if r.unrouted_fraction is None else r.unrouted_fraction,
            "expert_load": r.expert_load,
            "router_entropy": r.router_entropy,
        }
        return y_BSD, aux
