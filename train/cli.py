"""Command-line entry points. Thin: parse, set up the devices, call the library.

JAX is imported only after the device count is set, since XLA reads it when its backend starts.
"""

from __future__ import annotations

import argparse
import sys


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def bench_main(argv=None) -> int:
    from train.bench import BenchConfig  # no JAX import at module level

    d = BenchConfig()
    p = argparse.ArgumentParser(prog="moe-bench", description="MoE layer vs dense FFN of equal active FLOPs, fwd+bwd.")
    p.add_argument("--experts", type=_ints, default=d.experts, help="comma-separated expert counts (default 8,64)")
    p.add_argument("--d_model", type=int, default=d.d_model)
    p.add_argument("--d_ff", type=int, default=d.d_ff)
    p.add_argument("--experts_per_token", type=int, default=d.experts_per_token)
    p.add_argument("--capacity_factor", type=float, default=d.capacity_factor)
    p.add_argument("--router", default=d.router, choices=("topk", "hash", "random"))
    p.add_argument("--activation", default=d.activation, choices=("gelu", "silu", "relu"))
    p.add_argument("--tokens_per_device", type=int, default=d.tokens_per_device)
    p.add_argument("--seq_len", type=int, default=d.seq_len)
    p.add_argument("--data", type=int, default=d.data, help="mesh 'data' axis size")
    p.add_argument("--expert", type=int, default=d.expert, help="mesh 'expert' axis size")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--iters", type=int, default=d.iters)
    p.add_argument("--cpu_devices", type=int, default=8, help="CPU devices to emulate when no accelerator is used")
    p.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = p.parse_args(argv)
    cfg = BenchConfig(**{f: getattr(args, f) for f in BenchConfig.__dataclass_fields__})
    if cfg.tokens_per_device * cfg.data * cfg.expert % cfg.seq_len:
        p.error(f"--tokens_per_device={cfg.tokens_per_device}: total tokens must be a multiple of --seq_len={cfg.seq_len}")
    for e in cfg.experts:
        if e % cfg.expert:
            p.error(f"--experts={e}: not divisible by --expert={cfg.expert}")

    from sharding.mesh import emulate_cpu_devices

    emulate_cpu_devices(args.cpu_devices)
    import jax

    from train import bench

    if jax.device_count() < cfg.data * cfg.expert:
        p.error(f"--data x --expert = {cfg.data * cfg.expert} devices, but only {jax.device_count()} are present")
    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    print(f"moe-bench on {device}, jax {jax.__version__}", flush=True)
    try:
        rows = bench.run(cfg)
    except ValueError as e:
        print(f"moe-bench: {e}", file=sys.stderr)
        return 2
    if args.markdown:
        print(bench.markdown_table(cfg, rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(bench_main())
