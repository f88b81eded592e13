"""moe-bench: its two subcommands' argument parsing and output (the benchmarks live in
train/analysis/bench_layer.py and train/analysis/bench_train.py). JAX is imported only after the
device count is set."""

from __future__ import annotations

import argparse
import sys

from moe.config import ACTIVATIONS, DTYPES
from train.cli.common import Range, check_ranges, common_args, fail, ints, load_config, split_overrides, write_json


def grouped_matmuls(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated grouped-matmul implementations (moe.grouped_matmul.GROUPED_MATMULS)."""
    from moe.grouped_matmul import GROUPED_MATMULS

    out = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in out if v not in GROUPED_MATMULS]
    if bad or not out:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(GROUPED_MATMULS)}")
    return out


def _bench_outputs(p: argparse.ArgumentParser, name: str) -> None:
    common_args(p)
    p.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    p.add_argument("--json", default=f"runs/bench/{name}.json", help="write the results here ('' = nowhere)")


def _bench_device(cpu_devices: int) -> str:
    from sharding.mesh import emulate_cpu_devices

    emulate_cpu_devices(cpu_devices)
    import jax

    device = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    print(f"moe-bench on {device}, jax {jax.__version__}", flush=True)
    return device


def bench_layer_main(argv) -> int:
    from moe.routers import ROUTERS  # JAX imports, but no backend starts
    from train.analysis.bench_layer import BenchConfig

    prog = "moe-bench layer"
    d = BenchConfig()
    p = argparse.ArgumentParser(
        prog=prog, description="MoE layer vs a dense FFN of equal active FLOPs and a one-hot einsum dispatch, fwd+bwd."
    )
    p.add_argument("--experts", type=ints, default=d.experts, help="comma-separated expert counts (default 8,64,128)")
    p.add_argument("--tokens_per_device", type=ints, default=d.tokens_per_device, help="comma-separated (default 1024)")
    p.add_argument("--experts_per_token", type=ints, default=d.experts_per_token, help="comma-separated k (default 1)")
    p.add_argument("--d_model", type=int, default=d.d_model)
    p.add_argument("--d_ff", type=int, default=d.d_ff)
    p.add_argument("--capacity_factor", type=float, default=d.capacity_factor)
    p.add_argument("--router", default=d.router, choices=tuple(ROUTERS))
    p.add_argument("--activation", default=d.activation, choices=ACTIVATIONS)
    p.add_argument("--seq_len", type=int, default=d.seq_len)
    p.add_argument("--data", type=int, default=d.data, help="mesh 'data' axis size")
    p.add_argument("--expert", type=int, default=d.expert, help="mesh 'expert' axis size")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--iters", type=int, default=d.iters)
    p.add_argument("--dropless", action="store_true", help="also time model.dispatch='dropless'")
    p.add_argument("--grouped_matmul", type=grouped_matmuls, default=d.grouped_matmul,
                   help="with --dropless: comma-separated grouped-matmul implementations, a column each "
                        "(auto, ragged_dot, megablox, tokamax; default auto)")
    p.add_argument("--stages", action="store_true",
                   help="also profile the MoE (and dropless) layer: device time by named stage (route, permute, ...)")
    p.add_argument("--dtype", default=d.dtype, choices=DTYPES, help="activation dtype")
    p.add_argument("--sweep", action="store_true",
                   help="the full sweep: E 8,64,128 x tokens/device 1024,4096 x k 1,2")
    p.add_argument("--plot", help="write a PNG plot of the results here")
    _bench_outputs(p, "layer")
    args = p.parse_args(argv)
    check_ranges(prog, args, LAYER_RANGES)  # the comma-separated counts: positive by ``ints``
    if args.sweep:
        args.experts, args.tokens_per_device, args.experts_per_token = (8, 64, 128), (1024, 4096), (1, 2)
    cfg = BenchConfig(**{f: getattr(args, f) for f in BenchConfig.__dataclass_fields__})
    for tokens in cfg.tokens_per_device:
        if tokens * cfg.data * cfg.expert % cfg.seq_len:
            p.error(f"--tokens_per_device={tokens}: total tokens must be a multiple of --seq_len={cfg.seq_len}")
    for e in cfg.experts:
        if e % cfg.expert:
            p.error(f"--experts={e}: not divisible by --expert={cfg.expert}")
    for k in cfg.experts_per_token:
        if k > min(cfg.experts):
            p.error(f"--experts_per_token={k}: exceeds the smallest expert count {min(cfg.experts)}")
    device = _bench_device(args.cpu_devices)
    import jax

    from train.analysis import bench_layer as bench

    if jax.device_count() < cfg.data * cfg.expert:
        p.error(f"--data x --expert = {cfg.data * cfg.expert} devices, but only {jax.device_count()} are present")
    try:
        rows = bench.run(cfg)
    except ValueError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 2
    if args.markdown:
        print(bench.markdown_table(cfg, rows, device))
    write_json(args.json, {"device": device, "jax": jax.__version__, "config": vars(args), "rows": rows})
    if args.plot:
        bench.plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


def bench_train_main(argv) -> int:
    from train.analysis.bench_train import TrainBenchConfig

    prog = "moe-bench train"
    d = TrainBenchConfig()
    p = argparse.ArgumentParser(
        prog=prog, description="Training steps: MoE config vs its dense baseline, and step time as experts grow."
    )
    p.add_argument("--config", default="configs/default.py", help="the MoE config")
    p.add_argument("--dense_config", default="configs/dense_baseline.py",
                   help="its dense baseline; 'auto' = the MoE config with every block dense (model.moe_every=0)")
    p.add_argument("--experts", type=ints, default=d.experts, help="expert counts to sweep (default 8,16,32,64,128)")
    p.add_argument("--steps", type=int, default=d.steps, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--peak_size", type=int, default=d.peak_size, help="matmul size for the timed peak")
    p.add_argument("--sharded_state", action="store_true",
                   help="also time every MoE model with optimizer.sharded_state=True (ZeRO-1), side by side")
    _bench_outputs(p, "train")
    args, rest = p.parse_known_args(argv)
    check_ranges(prog, args, TRAIN_RANGES)
    overrides = split_overrides(rest, prog)  # --config.KEY=VALUE applies to both configs
    moe_cfg = load_config(prog, args.config, overrides)
    if args.dense_config == "auto":
        import copy

        dense_cfg = copy.deepcopy(moe_cfg)
        dense_cfg.model.moe_every = 0
    else:
        dense_cfg = load_config(prog, args.dense_config, overrides)
    for e in args.experts:
        if moe_cfg.mesh.expert > 0 and e % moe_cfg.mesh.expert:
            fail(prog, f"--experts={e}: not divisible by config.mesh.expert={moe_cfg.mesh.expert}")
    device = _bench_device(args.cpu_devices)
    import jax

    from train.analysis import bench_train

    bench = TrainBenchConfig(experts=args.experts, steps=args.steps, repeats=args.repeats, peak_size=args.peak_size,
                             sharded_state=args.sharded_state)
    result = bench_train.run(moe_cfg, dense_cfg, bench)
    print(bench_train.markdown(result, device, bench))
    write_json(args.json, {"device": device, "jax": jax.__version__, "config": vars(args), **result})
    return 0


def bench_main(argv=None) -> int:
    """moe-bench layer [...] | moe-bench train [...] (no subcommand: layer)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return bench_train_main(argv[1:])
    return bench_layer_main(argv[1:] if argv[:1] == ["layer"] else argv)


LAYER_RANGES = {"d_model": Range(1, 1 << 20), "d_ff": Range(1, 1 << 20), "capacity_factor": Range(0, 64, low_open=True),
                "seq_len": Range(1, 1 << 20), "data": Range(1, 4096), "expert": Range(1, 4096),
                "repeats": Range(1, 1000), "iters": Range(1, 10_000)}
TRAIN_RANGES = {"steps": Range(1, 10_000), "repeats": Range(1, 1000), "peak_size": Range(1, 1 << 16)}

