"""moe-bench: the MoE layer against a dense FFN of equal active FLOPs, side by side in one run.

Shape letters: B batch, S sequence, D model width, H hidden width, E experts.

For each expert count the MoE layer (top-k, capacity factor cf), a dense gated FFN with
hidden width k*d_ff (the same FLOPs per token as the k experts a token uses), and the same layer
with the GShard/Switch one-hot einsum dispatch in place of the sort-based one run forward +
backward on the same sharded batch. Runs alternate between the two so that machine noise hits
both alike; the table gives medians over repeats and their ratio.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moe import MoEConfig, MoEFeedForward
from moe.dispatch import DispatchPlan, exchange
from moe.config import TransformerConfig
from moe.transformer import DenseFFN
from sharding.mesh import batch_axes, make_mesh


@dataclasses.dataclass
class BenchConfig:
    experts: tuple[int, ...] = (8, 64)
    d_model: int = 256
    d_ff: int = 512
    experts_per_token: int = 1
    capacity_factor: float = 1.25
    router: str = "topk"
    activation: str = "silu"  # SwiGLU experts; the dense FFN uses the same activation
    tokens_per_device: int = 1024
    seq_len: int = 256
    data: int = 1  # mesh: data x expert devices
    expert: int = 8
    repeats: int = 7
    iters: int = 5


def _timed(fn, args, iters: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def onehot_dispatch_combine(x_BSD, ids_BSK, gates_BSK, experts, plan: DispatchPlan):
    """The GShard / Switch formulation of the same routing and capacity rule, as the papers write it.

    Shape letters as in moe/dispatch.py; one capacity group per device (plan.group_tokens = T).
    A one-hot [T, E, C] combine tensor is built from cumulative counts (first choices before
    second choices) and the tokens move with two einsums against it. Same inputs, same result
    as ``moe.dispatch.dispatch_combine``; here only to be measured against.
    """
    b, s, d = x_BSD.shape
    k = ids_BSK.shape[-1]
    e, c = plan.num_experts, plan.capacity
    t = b * s
    x_TD = x_BSD.reshape(t, d)
    mask_KTE = jax.nn.one_hot(ids_BSK.reshape(t, k).T, e, dtype=jnp.int32)
    position_KTE = (jnp.cumsum(mask_KTE.reshape(k * t, e), axis=0) - 1).reshape(k, t, e) * mask_KTE
    keep_KTE = mask_KTE * (position_KTE < c)
    gates_KT = gates_BSK.reshape(t, k).T.astype(jnp.float32)
    slot_KTEC = jax.nn.one_hot(position_KTE, c, dtype=jnp.float32) * keep_KTE[..., None]
    combine_TEC = jnp.einsum("kt,ktec->tec", gates_KT, slot_KTEC)
    dispatch_TEC = jnp.sum(slot_KTEC, axis=0).astype(x_BSD.dtype)
    buf_ECD = jnp.einsum("tec,td->ecd", dispatch_TEC, x_TD)
    out_ECD = exchange(experts(exchange(buf_ECD, plan, forward=True)), plan, forward=False)
    y_TD = jnp.einsum("tec,ecd->td", combine_TEC, out_ECD.astype(jnp.float32)).astype(x_BSD.dtype)
    dropped = jnp.sum(mask_KTE - keep_KTE).astype(jnp.float32)
    if plan.stat_axes:
        dropped = jax.lax.psum(dropped, plan.stat_axes)
    return y_TD.reshape(b, s, d), dropped


def _dense_ffn_step(d_model: int, d_hidden: int, activation: str):
    """The model's own dense FFN block (moe.transformer.DenseFFN), gated like the experts."""
    dense = DenseFFN(
        TransformerConfig(vocab_size=1, d_model=d_model, d_ff=d_hidden, activation=activation, gated=True),
        rngs=nnx.Rngs(2),
    )

    def loss(dense, x_BSD):
        return jnp.sum(dense(x_BSD))

    return dense, nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1)))


def run(cfg: BenchConfig, log=print) -> list[dict]:
    mesh = make_mesh(data=cfg.data, expert=cfg.expert)
    n_dev = cfg.data * cfg.expert
    tokens = cfg.tokens_per_device * n_dev
    b, s = tokens // cfg.seq_len, cfg.seq_len
    rows = []
    with jax.set_mesh(mesh):
        spec = jax.P(batch_axes(mesh))
        x_BSD = jax.random.normal(jax.random.key(0), (b, s, cfg.d_model), out_sharding=spec)
        ids_BS = jax.random.randint(jax.random.key(1), (b, s), 0, 50_000, out_sharding=spec)
        dense, dense_step = _dense_ffn_step(cfg.d_model, cfg.experts_per_token * cfg.d_ff, cfg.activation)
        for num_experts in cfg.experts:
            mcfg = MoEConfig(
                d_model=cfg.d_model, d_ff=cfg.d_ff, num_experts=num_experts, experts_per_token=cfg.experts_per_token,
                router=cfg.router, capacity_factor=cfg.capacity_factor, activation=cfg.activation,
            )
            layer = MoEFeedForward(mcfg, rngs=nnx.Rngs(0))

            def loss(layer, x_BSD):
                y_BSD, aux = layer(x_BSD, ids_BS)
                return jnp.sum(y_BSD) + aux["router_loss"], aux["dropped_fraction"]

            def onehot_loss(layer, x_BSD):
                y_BSD, aux = layer.forward_with(onehot_dispatch_combine, x_BSD, ids_BS)
                return jnp.sum(y_BSD) + aux["router_loss"], aux["dropped_fraction"]

            moe_step = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
            onehot_step = nnx.jit(nnx.value_and_grad(onehot_loss, argnums=(0, 1), has_aux=True))
            (_, dropped), _ = moe_step(layer, x_BSD)
            times = {"moe": [], "dense": [], "onehot": []}
            for _ in range(cfg.repeats):
                times["moe"].append(_timed(moe_step, (layer, x_BSD), cfg.iters))
                times["dense"].append(_timed(dense_step, (dense, x_BSD), cfg.iters))
                times["onehot"].append(_timed(onehot_step, (layer, x_BSD), cfg.iters))
            row = {"experts": num_experts, "dropped_fraction": float(dropped)}
            row.update({f"{name}_ms": 1e3 * statistics.median(t) for name, t in times.items()})
            row["ratio"] = row["moe_ms"] / row["dense_ms"]
            row["onehot_speedup"] = row["onehot_ms"] / row["moe_ms"]
            rows.append(row)
            log(
                f"E={num_experts:3d}  moe {row['moe_ms']:8.2f} ms  dense {row['dense_ms']:8.2f} ms  "
                f"one-hot {row['onehot_ms']:8.2f} ms  moe/dense {row['ratio']:.2f}  "
                f"one-hot/moe {row['onehot_speedup']:.2f}  dropped {row['dropped_fraction']:.3f}"
            )
    return rows


def markdown_table(cfg: BenchConfig, rows: list[dict], device: str) -> str:
    head = (
        f"fwd+bwd, {device}, mesh data={cfg.data} x expert={cfg.expert}, top-{cfg.experts_per_token} "
        f"{cfg.router}, {cfg.activation} GLU, cf {cfg.capacity_factor}, d={cfg.d_model}, d_ff={cfg.d_ff}, "
        f"{cfg.tokens_per_device} tokens/device; medians of {cfg.repeats} x {cfg.iters} steps\n\n"
        "| experts | MoE layer (ms) | dense FFN, equal active FLOPs (ms) | one-hot einsum dispatch (ms) "
        "| MoE / dense | one-hot / MoE | dropped |\n"
        "|---:|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['experts']} | {r['moe_ms']:.2f} | {r['dense_ms']:.2f} | {r['onehot_ms']:.2f} | {r['ratio']:.2f} "
        f"| {r['onehot_speedup']:.2f} | {r['dropped_fraction']:.3f} |\n"
        for r in rows
    )
    return head + body
