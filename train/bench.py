"""moe-bench: the MoE layer against a dense FFN of equal active FLOPs, side by side in one run.

Shape letters: B batch, S sequence, D model width, H hidden width, E experts.

For each expert count the MoE layer (top-k, capacity factor cf) and a dense gated FFN with
hidden width k*d_ff (the same FLOPs per token as the k experts a token uses) run forward +
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
from moe.experts import ACTIVATION_FNS
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


def _dense_ffn_step(d_model: int, d_hidden: int, activation: str, key):
    k1, k2, k3 = jax.random.split(key, 3)
    params = {
        "wi": jax.random.normal(k1, (d_model, d_hidden)) * d_model**-0.5,
        "wg": jax.random.normal(k2, (d_model, d_hidden)) * d_model**-0.5,
        "wo": jax.random.normal(k3, (d_hidden, d_model)) * d_hidden**-0.5,
    }
    act = ACTIVATION_FNS[activation]

    def loss(params, x_BSD):
        h_BSH = act(x_BSD @ params["wg"]) * (x_BSD @ params["wi"])
        return jnp.sum(h_BSH @ params["wo"])

    return params, jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


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
        dense_params, dense_step = _dense_ffn_step(
            cfg.d_model, cfg.experts_per_token * cfg.d_ff, cfg.activation, jax.random.key(2)
        )
        for num_experts in cfg.experts:
            mcfg = MoEConfig(
                d_model=cfg.d_model, d_ff=cfg.d_ff, num_experts=num_experts, experts_per_token=cfg.experts_per_token,
                router=cfg.router, capacity_factor=cfg.capacity_factor, activation=cfg.activation,
            )
            layer = MoEFeedForward(mcfg, rngs=nnx.Rngs(0))

            def loss(layer, x_BSD):
                y_BSD, aux = layer(x_BSD, ids_BS)
                return jnp.sum(y_BSD) + aux["router_loss"], aux["dropped_fraction"]

            moe_step = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
            (_, dropped), _ = moe_step(layer, x_BSD)
            moe_t, dense_t = [], []
            for _ in range(cfg.repeats):
                moe_t.append(_timed(moe_step, (layer, x_BSD), cfg.iters))
                dense_t.append(_timed(dense_step, (dense_params, x_BSD), cfg.iters))
            row = dict(
                experts=num_experts,
                moe_ms=1e3 * statistics.median(moe_t),
                dense_ms=1e3 * statistics.median(dense_t),
                dropped_fraction=float(dropped),
            )
            row["ratio"] = row["moe_ms"] / row["dense_ms"]
            rows.append(row)
            log(
                f"E={num_experts:3d}  moe {row['moe_ms']:8.2f} ms  dense {row['dense_ms']:8.2f} ms  "
                f"ratio {row['ratio']:.2f}  dropped {row['dropped_fraction']:.3f}"
            )
    return rows


def markdown_table(cfg: BenchConfig, rows: list[dict], device: str) -> str:
    head = (
        f"fwd+bwd, {device}, mesh data={cfg.data} x expert={cfg.expert}, top-{cfg.experts_per_token} "
        f"{cfg.router}, {cfg.activation} GLU, cf {cfg.capacity_factor}, d={cfg.d_model}, d_ff={cfg.d_ff}, "
        f"{cfg.tokens_per_device} tokens/device; medians of {cfg.repeats} x {cfg.iters} steps\n\n"
        "| experts | MoE layer (ms) | dense FFN, equal active FLOPs (ms) | MoE / dense | dropped |\n"
        "|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['experts']} | {r['moe_ms']:.2f} | {r['dense_ms']:.2f} | {r['ratio']:.2f} | {r['dropped_fraction']:.3f} |\n"
        for r in rows
    )
    return head + body
