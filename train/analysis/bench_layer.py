"""moe-bench layer: the MoE layer against a dense FFN of equal active FLOPs and against the
GShard/Switch one-hot einsum dispatch, side by side in one run.

Shape letters: see ``moe/__init__.py``.

For each (tokens per device, k, E) the MoE layer (top-k, capacity factor cf), a dense gated FFN
with hidden width k*d_ff (the FLOPs per token of the k experts a token uses) and the same layer
with the one-hot einsum dispatch in place of the sort-based one run forward + backward on the
same sharded batch. Runs alternate between the cases so that machine noise hits all alike; rows
give medians over repeats, their ratios, and XLA's temporary-buffer bytes of each program.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moe import FFNConfig, MoEConfig, MoEFeedForward
from moe.dispatch import DispatchPlan, LocalRoute, exchange
from moe.grouped_matmul import resolve as resolve_grouped_matmul
from moe.transformer import DenseFFN
from sharding.mesh import batch_axes, make_mesh
from train.analysis.stages import STAGES, StageProfileError, profile_compiler_options, stage_line, stage_times


@dataclasses.dataclass
class BenchConfig:
    experts: tuple[int, ...] = (8, 64, 128)
    tokens_per_device: tuple[int, ...] = (1024,)
    experts_per_token: tuple[int, ...] = (1,)
    d_model: int = 256
    d_ff: int = 512
    capacity_factor: float = 1.25
    router: str = MoEConfig.router  # the default router
    activation: str = "silu"  # SwiGLU experts; the dense FFN uses the same activation
    seq_len: int = 256
    data: int = 1  # mesh: data x expert devices
    expert: int = 8
    repeats: int = 5
    iters: int = 3
    dropless: bool = False  # also time model.dispatch="dropless"
    # dropless: one column per grouped-matmul implementation (moe.grouped_matmul.GROUPED_MATMULS)
    grouped_matmul: tuple[str, ...] = ("auto",)
    stages: bool = False  # profile the MoE (and dropless) cases once more: device time by named stage
    dtype: str = "float32"  # activations and expert compute ("bfloat16": weights stay float32)


def dropless_cases(cfg: BenchConfig) -> list[tuple[str, str]]:
    """(case name, grouped-matmul implementation) of each dropless column: "dropless" for the
    first implementation, "dropless_<impl>" for the others."""
    if not cfg.dropless:
        return []
    return [("dropless" if i == 0 else f"dropless_{impl}", impl) for i, impl in enumerate(cfg.grouped_matmul)]


def _timed(fn, args, iters: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    start = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def onehot_dispatch(x_BSD, route: LocalRoute, experts, plan: DispatchPlan):
    """The GShard / Switch formulation of the same routing and capacity rule, as the papers write it.

    A dispatch strategy like ``moe.dispatch.capacity_dispatch``; one capacity group per device
    (plan.group_tokens = T).
    A one-hot [T, E, C] combine tensor is built from cumulative counts (in ``plan.priority``
    order: token by token, or every first choice before any second choice) and the tokens move
    with two einsums against it. Same inputs, same result as ``moe.dispatch.dispatch_combine``;
    here only to be measured against.
    """
    ids_BSK, gates_BSK = route.ids_BSK, route.gates_BSK
    b, s, d = x_BSD.shape
    k = ids_BSK.shape[-1]
    e, c = plan.num_experts, plan.capacity
    t = b * s
    x_TD = x_BSD.reshape(t, d)
    mask_TKE = jax.nn.one_hot(ids_BSK.reshape(t, k), e, dtype=jnp.int32)
    if plan.priority == "token":  # slot = how many earlier assignments in (token, choice) order chose e
        position_TKE = (jnp.cumsum(mask_TKE.reshape(t * k, e), axis=0) - 1).reshape(t, k, e) * mask_TKE
    else:  # (choice, token) order
        mask_KTE = mask_TKE.transpose(1, 0, 2)
        position_KTE = (jnp.cumsum(mask_KTE.reshape(k * t, e), axis=0) - 1).reshape(k, t, e) * mask_KTE
        position_TKE = position_KTE.transpose(1, 0, 2)
    keep_TKE = mask_TKE * (position_TKE < c)
    slot_TKEC = jax.nn.one_hot(position_TKE, c, dtype=jnp.float32) * keep_TKE[..., None]
    combine_TEC = jnp.einsum("tk,tkec->tec", gates_BSK.reshape(t, k).astype(jnp.float32), slot_TKEC)
    dispatch_TEC = jnp.sum(slot_TKEC, axis=1).astype(x_BSD.dtype)
    buf_ECD = jnp.einsum("tec,td->ecd", dispatch_TEC, x_TD)
    out_ECD = exchange(experts.batched(exchange(buf_ECD, plan, forward=True)), plan, forward=False)
    y_TD = jnp.einsum("tec,ecd->td", combine_TEC, out_ECD.astype(jnp.float32)).astype(x_BSD.dtype)
    dropped = jnp.sum(mask_TKE - keep_TKE).astype(jnp.float32)
    if plan.stat_axes:
        dropped = jax.lax.psum(dropped, plan.stat_axes)
    return y_TD.reshape(b, s, d), dropped


def _compiled_fwd_bwd(module, loss, x_BSD, compiler_options=None):
    """jit(value_and_grad(loss)) over (module state, x), compiled; with its arguments."""
    graphdef, state = nnx.split(module)

    def f(state, x_BSD):
        return jax.value_and_grad(lambda s, x: loss(nnx.merge(graphdef, s), x), argnums=(0, 1), has_aux=True)(
            state, x_BSD
        )

    return jax.jit(f).lower(state, x_BSD).compile(compiler_options), (state, x_BSD)


def _temp_bytes(compiled) -> int | None:
    """XLA's temporary-buffer bytes per device for a compiled program (None where not reported)."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except (AttributeError, TypeError, NotImplementedError):
        return None


def _dense_ffn(d_model: int, d_hidden: int, activation: str, dtype: str) -> DenseFFN:
    """The model's own dense FFN block (moe.transformer.DenseFFN), gated like the experts."""
    return DenseFFN(FFNConfig(d_model, d_hidden, activation, True, dtype), rngs=nnx.Rngs(2))


def _cases(cfg: BenchConfig, num_experts: int, k: int, ids_BS):
    """name -> (module, loss) for the MoE layer and the formulations it is measured against."""
    mcfg = MoEConfig(num_experts=num_experts, experts_per_token=k, router=cfg.router, capacity_factor=cfg.capacity_factor)
    ffn = FFNConfig(cfg.d_model, cfg.d_ff, cfg.activation, True, cfg.dtype)
    layer = MoEFeedForward(mcfg, ffn, rngs=nnx.Rngs(0))

    def moe_loss(layer, x_BSD):
        y_BSD, stats = layer(x_BSD, ids_BS)
        return jnp.sum(y_BSD) + stats.router_loss, stats.dropped_fraction

    def onehot_loss(layer, x_BSD):
        y_BSD, stats = layer(x_BSD, ids_BS, dispatch=onehot_dispatch)
        return jnp.sum(y_BSD) + stats.router_loss, stats.dropped_fraction

    def dense_loss(dense, x_BSD):
        return jnp.sum(dense(x_BSD)), jnp.zeros((), jnp.float32)

    cases = {
        "moe": (layer, moe_loss),
        "dense": (_dense_ffn(cfg.d_model, k * cfg.d_ff, cfg.activation, cfg.dtype), dense_loss),
        "onehot": (layer, onehot_loss),
    }
    for name, impl in dropless_cases(cfg):
        dropless = dataclasses.replace(mcfg, dispatch="dropless", ragged_exchange=jax.default_backend() != "cpu",
                                       grouped_matmul=resolve_grouped_matmul(impl, jax.default_backend()))
        cases[name] = (MoEFeedForward(dropless, ffn, rngs=nnx.Rngs(0)), moe_loss)
    return cases


def run(cfg: BenchConfig, log=print) -> list[dict]:
    """One row per (tokens per device, k, E): median fwd+bwd ms and temp bytes of each case."""
    mesh = make_mesh(data=cfg.data, expert=cfg.expert)
    n_dev = cfg.data * cfg.expert
    rows = []
    with jax.set_mesh(mesh):
        spec = jax.P(batch_axes(mesh))
        for tokens_per_device in cfg.tokens_per_device:
            b, s = tokens_per_device * n_dev // cfg.seq_len, cfg.seq_len
            x_BSD = jax.random.normal(jax.random.key(0), (b, s, cfg.d_model), cfg.dtype, out_sharding=spec)
            ids_BS = jax.random.randint(jax.random.key(1), (b, s), 0, 50_000, out_sharding=spec)
            for k in cfg.experts_per_token:
                for num_experts in cfg.experts:
                    cases = _cases(cfg, num_experts, k, ids_BS)
                    steps = {name: _compiled_fwd_bwd(module, loss, x_BSD) for name, (module, loss) in cases.items()}
                    (_, dropped), _ = steps["moe"][0](*steps["moe"][1])
                    times = {name: [] for name in steps}
                    for _ in range(cfg.repeats):  # alternate, so that noise hits every case alike
                        for name, (fn, args) in steps.items():
                            times[name].append(_timed(fn, args, cfg.iters))
                    row = {"tokens_per_device": tokens_per_device, "k": k, "experts": num_experts,
                           "dropped_fraction": float(dropped)}
                    for name, t in times.items():
                        row[f"{name}_ms"] = 1e3 * statistics.median(t)
                        row[f"{name}_temp_bytes"] = _temp_bytes(steps[name][0])
                    row["moe_vs_dense"] = row["moe_ms"] / row["dense_ms"]
                    row["onehot_vs_moe"] = row["onehot_ms"] / row["moe_ms"]
                    for name, impl in dropless_cases(cfg):
                        row[f"{name}_vs_moe"] = row[f"{name}_ms"] / row["moe_ms"]
                    if cfg.stages:
                        options = profile_compiler_options(jax.default_backend())  # GPU: no command buffers
                        for name in ("moe", *(n for n, _ in dropless_cases(cfg))):
                            program = _compiled_fwd_bwd(*cases[name], x_BSD, options) if options else steps[name]
                            try:
                                row[f"{name}_stages_ms"] = stage_times(*program, calls=cfg.iters)
                                log(f"  {name} by stage (ms per device): {stage_line(row[f'{name}_stages_ms'])}")
                            except StageProfileError as e:
                                row[f"{name}_stages_error"] = str(e)
                                log(f"  {name} by stage: unavailable: {e}")
                    if row["moe_temp_bytes"] and row["dense_temp_bytes"]:
                        row["temp_moe_vs_dense"] = row["moe_temp_bytes"] / row["dense_temp_bytes"]
                    rows.append(row)
                    log(
                        f"tokens/device={tokens_per_device} k={k} E={num_experts:3d}  moe {row['moe_ms']:8.2f} ms  "
                        f"dense {row['dense_ms']:8.2f} ms  one-hot {row['onehot_ms']:8.2f} ms"
                        + "".join(f"  dropless {impl} {row[f'{name}_ms']:8.2f} ms" for name, impl in dropless_cases(cfg))
                        + f"  moe/dense {row['moe_vs_dense']:.2f}  one-hot/moe {row['onehot_vs_moe']:.2f}  "
                        f"dropped {row['dropped_fraction']:.3f}"
                    )
    return rows


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.1f}"


def markdown_table(cfg: BenchConfig, rows: list[dict], device: str) -> str:
    dropless = dropless_cases(cfg)
    label = {name: "dropless" if len(dropless) == 1 else f"dropless {impl}" for name, impl in dropless}
    head = (
        f"fwd+bwd, {device}, {cfg.dtype}, mesh data={cfg.data} x expert={cfg.expert}, {cfg.router} router, "
        f"{cfg.activation} GLU, cf {cfg.capacity_factor}, d={cfg.d_model}, d_ff={cfg.d_ff}; "
        f"medians of {cfg.repeats} x {cfg.iters} steps; temp = XLA temporary buffers per device (MiB)\n\n"
        "| tokens/device | k | experts | MoE (ms) | dense FFN (ms) | one-hot (ms) "
        + "".join(f"| {label[name]} (ms) " for name, _ in dropless)
        + "| MoE / dense | one-hot / MoE "
        + "".join(f"| {label[name]} / MoE " for name, _ in dropless)
        + "| temp MoE | temp dense | temp one-hot | dropped |\n"
        + "|---:" * (12 + 2 * len(dropless)) + "|\n"
    )
    body = "".join(
        f"| {r['tokens_per_device']} | {r['k']} | {r['experts']} | {r['moe_ms']:.1f} | {r['dense_ms']:.1f} "
        f"| {r['onehot_ms']:.1f} "
        + "".join(f"| {r[f'{name}_ms']:.1f} " for name, _ in dropless)
        + f"| {r['moe_vs_dense']:.2f} | {r['onehot_vs_moe']:.2f} "
        + "".join(f"| {r[f'{name}_vs_moe']:.2f} " for name, _ in dropless)
        + f"| {_mib(r['moe_temp_bytes'])} "
        f"| {_mib(r['dense_temp_bytes'])} | {_mib(r['onehot_temp_bytes'])} | {r['dropped_fraction']:.3f} |\n"
        for r in rows
    )
    return head + body + (stages_table(rows) if cfg.stages else "")


def stages_table(rows: list[dict]) -> str:
    """Device time per stage (forward + backward) of each profiled case, in ms per device."""
    cols = (*STAGES, "other")
    out = ("\nby stage, forward + backward (ms per device, from a profile of the same programs)\n\n"
           "| tokens/device | k | experts | case | " + " | ".join(cols) + " |\n" + "|---:" * 3 + "|---" + "|---:" * len(cols) + "|\n")
    for r in rows:
        for key in (k for k in r if k.endswith(("_stages_ms", "_stages_error"))):
            st = r[key]  # the stages' ms, or why the profile gave none
            cells = ([f"{st.get(c, 0.0) + st.get(f'{c} bwd', 0.0):.2f}" for c in cols] if isinstance(st, dict)
                     else ["n/a"] * len(cols))
            out += (f"| {r['tokens_per_device']} | {r['k']} | {r['experts']} | {key.rsplit('_stages_', 1)[0]} | "
                    + " | ".join(cells) + " |\n")
    return out


def plot(rows: list[dict], path) -> None:
    """One panel per (tokens per device, k): fwd+bwd ms against the number of experts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["tokens_per_device"], r["k"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (tokens, k) in zip(axes[0], panels, strict=True):
        sub = sorted((r for r in rows if (r["tokens_per_device"], r["k"]) == (tokens, k)), key=lambda r: r["experts"])
        es = [r["experts"] for r in sub]
        curves = [("moe", "MoE layer"), ("dense", "dense FFN, equal FLOPs"), ("onehot", "one-hot einsum")]
        curves += [(key[:-3], key[:-3].replace("_", " ")) for key in sub[0]
                   if key.startswith("dropless") and key.endswith("_ms") and not key.endswith("_stages_ms")]
        for name, label in curves:
            if f"{name}_ms" in sub[0]:
                ax.plot(es, [r[f"{name}_ms"] for r in sub], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(es, [str(e) for e in es])
        ax.set_xlabel("experts")
        ax.set_ylabel("fwd+bwd (ms)")
        ax.set_title(f"{tokens} tokens/device, top-{k}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
