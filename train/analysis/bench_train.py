"""moe-bench train: full training steps of the MoE config vs its dense baseline, and step time as
the expert count grows at fixed active parameters; MFU against a matmul peak timed in the same run.

Every model is a real run (``train.core.setup.setup``) (same mesh, rules, jitted step, donation) on the same prefetched
batches; only the device step is timed (data loading excluded). Models are timed in alternation
so that machine noise falls on all of them alike; the tables give medians over repeats.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

from moe.costs import flops_per_token, param_counts
from train.core.config import Config, validate_mesh
from train.core.setup import setup
from train.services.metrics import NOMINAL_PEAK_FLOPS, peak_flops_per_device


@dataclasses.dataclass
class TrainBenchConfig:
    experts: tuple[int, ...] = (8, 16, 32, 64, 128)  # the expert-count sweep (MoE config)
    steps: int = 5  # timed steps per repeat
    repeats: int = 5
    batches: int = 4  # distinct prefetched batches, cycled
    max_bytes: int = 1_000_000  # training text read (only enough to fill the batches is needed)
    peak_size: int = 1024  # the matmul peak: [N, N] @ [N, N] per device
    sharded_state: bool = False  # also time each swept MoE model with optimizer.sharded_state (ZeRO-1)


def matmul_peak(mesh, dtype: str, n: int, repeats: int = 5) -> float:
    """FLOP/s of the whole mesh on a sharded matmul: every device multiplies its own [n, n] block
    by an [n, n] matrix. The best of ``repeats`` timings: the machine's own attainable peak."""
    devices = mesh.devices.size
    sharding = jax.sharding.NamedSharding(mesh, jax.P(mesh.axis_names))
    a = jax.device_put(jnp.ones((devices * n, n), dtype), sharding)
    b = jax.device_put(jnp.ones((n, n), dtype), jax.sharding.NamedSharding(mesh, jax.P()))
    f = jax.jit(lambda a, b: a @ b, out_shardings=sharding)
    jax.block_until_ready(f(a, b))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(3):
            out = f(a, b)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / 3)
    return 2.0 * devices * n**3 / best


class _Model:
    """One model to time: its run, its state and prefetched device batches."""

    def __init__(self, name: str, cfg: Config, workdir: pathlib.Path, batches: int):
        self.name = name
        self.run, state = setup(cfg, workdir, log=lambda _: None)
        with self.run.context():
            self.batches = [self.run.global_batch(next(self.run.batches)) for _ in range(batches)]
            state, _ = self.run.train_step(state, self.batches[0])  # compile
            self.state = jax.block_until_ready(state)
        self.cfg = self.run.cfg
        self.times: list[float] = []

    def time(self, steps: int) -> None:
        with self.run.context():
            start = time.perf_counter()
            state = self.state
            for i in range(steps):
                state, metrics = self.run.train_step(state, self.batches[i % len(self.batches)])
            jax.block_until_ready(metrics)
            self.state = state
        self.times.append((time.perf_counter() - start) / steps)

    def row(self, peak: float, spec_peak: float | None) -> dict:
        step_s = statistics.median(self.times)
        tokens = self.cfg.train.batch_size * self.cfg.train.seq_len
        counts = param_counts(self.cfg.model)
        flops = flops_per_token(self.cfg.model, self.cfg.train.seq_len)
        return {
            "model": self.name,
            "experts": self.cfg.model.moe.num_experts if self.cfg.model.moe_every else 0,
            "params": counts["total"],
            "active_params": counts["active"],
            "step_ms": 1e3 * step_s,
            "tokens_per_s": tokens / step_s,
            "mfu": tokens / step_s * flops / peak,
            "mfu_vs_spec": None if spec_peak is None else tokens / step_s * flops / spec_peak,
            "flops_per_token": flops,
        }


def run(moe_cfg: Config, dense_cfg: Config, bench: TrainBenchConfig, log=print) -> dict:
    """Time the MoE config, its dense baseline and the expert sweep; returns the tables as a dict."""
    configs = {"moe": moe_cfg, "dense": dense_cfg}
    for e in bench.experts:
        if e != moe_cfg.model.moe.num_experts:
            swept = copy.deepcopy(moe_cfg)
            swept.model.moe.num_experts = e
            configs[f"moe E={e}"] = swept
    if bench.sharded_state:  # the same models with the optimizer state split over every device
        for name, cfg in list(configs.items()):
            if name != "dense" and not cfg.optimizer.sharded_state:
                zero = copy.deepcopy(cfg)
                zero.optimizer.sharded_state = True
                configs[f"{name} sharded"] = zero
    models = []
    with tempfile.TemporaryDirectory(prefix="moe-bench-train-") as tmp:
        for name, cfg in configs.items():
            cfg = copy.deepcopy(cfg)
            cfg.data.max_bytes = min(cfg.data.max_bytes or bench.max_bytes, bench.max_bytes)
            cfg.checkpoint.every_steps = 0
            validate_mesh(cfg, jax.device_count())
            log(f"compiling {name} ...")
            models.append(_Model(name, cfg, pathlib.Path(tmp) / name.replace(" ", "_").replace("=", ""), bench.batches))
        mesh = models[0].run.mesh
        peak = matmul_peak(mesh, moe_cfg.model.dtype, bench.peak_size)
        log(f"matmul peak on {mesh.devices.size} devices ({moe_cfg.model.dtype}): {peak / 1e9:.1f} GFLOP/s")
        for r in range(bench.repeats):
            for m in models:
                m.time(bench.steps)
            log(f"repeat {r + 1}/{bench.repeats}: " + "  ".join(f"{m.name} {1e3 * m.times[-1]:.0f} ms" for m in models))
        kind = mesh.devices.flat[0].device_kind
        spec = peak_flops_per_device(kind, "float32" if moe_cfg.model.dtype == "float32" else "bfloat16")
        spec_peak = None if spec == NOMINAL_PEAK_FLOPS else spec * mesh.devices.size
        rows = [m.row(peak, spec_peak) for m in models]
        for m in models:
            m.run.close()
    by_name = {r["model"]: r for r in rows}
    sweep = sorted((r for r in rows if r["model"] != "dense" and not r["model"].endswith(" sharded")),
                   key=lambda r: r["experts"])
    smallest = sweep[0]
    for r in sweep:
        r["step_vs_smallest"] = r["step_ms"] / smallest["step_ms"]
        sharded = by_name.get(f"{r['model']} sharded")
        if sharded is not None:
            r["sharded_step_ms"] = sharded["step_ms"]
            r["sharded_vs_replicated"] = sharded["step_ms"] / r["step_ms"]
    return {
        "peak_flops": peak,
        "spec_peak_flops": spec_peak,
        "dtype": moe_cfg.model.dtype,
        "moe": by_name["moe"],
        "dense": by_name["dense"],
        "moe_vs_dense_tokens_per_s": by_name["moe"]["tokens_per_s"] / by_name["dense"]["tokens_per_s"],
        "expert_sweep": sweep,
    }


def markdown(result: dict, device: str, bench: TrainBenchConfig) -> str:
    moe, dense = result["moe"], result["dense"]
    head = (
        f"Training steps on {device} ({result['dtype']}); medians of {bench.repeats} x {bench.steps} steps; "
        f"MFU against a matmul peak of {result['peak_flops'] / 1e9:.1f} GFLOP/s timed in the same run"
        + (f" (spec sheet: {result['spec_peak_flops'] / 1e12:.0f} TFLOP/s)" if result["spec_peak_flops"] else "")
        + "\n\n| model | params | active params | step (ms) | tokens/s | MFU (timed peak) | MFU (spec) |\n"
        "|---|---:|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['model']} | {r['params']:,} | {r['active_params']:,} | {r['step_ms']:.1f} | {r['tokens_per_s']:,.0f} "
        f"| {100 * r['mfu']:.1f}% | " + ("n/a" if r["mfu_vs_spec"] is None else f"{100 * r['mfu_vs_spec']:.1f}%") + " |\n"
        for r in (moe, dense)
    )
    ratio = f"\nMoE / dense tokens/s: {result['moe_vs_dense_tokens_per_s']:.2f}\n\n"
    sharded = "sharded_step_ms" in result["expert_sweep"][0]
    sweep = ("| experts | params | step (ms) | vs smallest E |"
             + (" step, sharded optimizer state (ms) | sharded / replicated |" if sharded else "")
             + "\n|---:|---:|---:|---:|" + ("---:|---:|" if sharded else "") + "\n")
    for r in result["expert_sweep"]:
        sweep += f"| {r['experts']} | {r['params']:,} | {r['step_ms']:.1f} | {r['step_vs_smallest']:.2f} |"
        if sharded:
            sweep += f" {r['sharded_step_ms']:.1f} | {r['sharded_vs_replicated']:.2f} |"
        sweep += "\n"
    return head + body + ratio + sweep
