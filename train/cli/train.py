"""moe-train: train a sparse MoE language model (``python -m train`` is the same)."""

from __future__ import annotations

import argparse
import sys

from train.cli.common import (Range, check_ranges, check_workdir, common_args, fail, load_config, run_guarded,
                              split_overrides, start_jax)


def train_main(argv=None) -> int:
    """moe-train --config=configs/default.py --workdir=DIR [--config.KEY=VALUE ...]"""
    prog = "moe-train"
    p = argparse.ArgumentParser(prog=prog, description="Train a sparse MoE language model.")
    p.add_argument("--config", required=True, help="a configs/*.py file defining get_config()")
    p.add_argument("--workdir", help="run folder: config, logs, checkpoints (not needed with --plan)")
    p.add_argument("--dry_run", action="store_true", help="validate and print the config and parameter counts")
    p.add_argument("--plan", action="store_true",
                   help="compile the training step ahead of time for the mesh (emulate it with --cpu_devices) and "
                        "print what each device needs; the last line is JSON; exit 3 if it does not fit")
    p.add_argument("--device_memory_gb", type=float, default=None,
                   help="with --plan: the memory of one device (GiB) to check the plan against")
    p.add_argument("--skip_memory_check", action="store_true",
                   help="start even when a step's estimated memory exceeds what the devices have")
    common_args(p)
    from sharding.distributed import add_arguments

    add_arguments(p)
    args, rest = p.parse_known_args(argv)
    check_ranges(prog, args, {"device_memory_gb": Range(0, 1 << 20, low_open=True, unit=" GiB")})
    if args.device_memory_gb is not None and not args.plan:
        fail(prog, f"--device_memory_gb={args.device_memory_gb}: goes with --plan")
    if not args.plan:
        if not args.workdir:
            fail(prog, "--workdir: required (a run folder for config, logs and checkpoints)")
        check_workdir(prog, args.workdir)
    cfg = load_config(prog, args.config, split_overrides(rest, prog))
    start_jax(prog, args, distributed=True)
    return run_guarded(prog, args.verbose, lambda: _train(cfg, args))


def _dry_run(cfg, sizes) -> int:
    """The resolved config, the mesh and the parameter counts; nothing is built."""
    import jax

    from moe.costs import param_counts
    from train.analysis.plan import resolved_vocab
    from train.data.prepared import is_prepared

    resolved = resolved_vocab(cfg)
    print(resolved.to_json())
    mesh = " x ".join(f"{k}={v}" for k, v in sizes.items())
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; mesh {mesh}; rules {cfg.mesh.rules}")
    note = ""
    if not (cfg.model.vocab_size or cfg.data.tokenizer == "byte" or cfg.data.tokenizer_path or is_prepared(cfg.data.path)):
        note = f" (vocabulary {resolved.model.vocab_size} from data.bpe_vocab_size; the trained BPE may be smaller)"
    counts = param_counts(resolved.model)
    print(f"parameters: {counts['total']:,} total, {counts['active']:,} active per token{note}")
    return 0


def print_plan(cfg, device_memory_gb) -> int:
    """``--plan``: the compiled step's memory per device and FLOPs; the last stdout line is JSON."""
    import json

    from train.analysis.plan import make_plan, parameter_line

    print(parameter_line(cfg), flush=True)
    plan = make_plan(cfg, device_memory_gb=device_memory_gb)
    print("\n".join(plan.lines()))
    print(json.dumps(plan.as_json()), flush=True)
    return 3 if plan.fits is False else 0


def _train(cfg, args) -> int:
    import jax

    from moe.costs import param_counts
    from train.core.config import validate_mesh
    from train.core.loop import Progress, train
    from train.core.setup import setup

    sizes = validate_mesh(cfg, jax.device_count())
    if args.dry_run:
        return _dry_run(cfg, sizes)
    if args.plan:
        return print_plan(cfg, args.device_memory_gb)
    from sharding.distributed import prefix
    from train.services.signals import StopSignals

    signals = StopSignals(lambda m: print(f"{prefix()}{m}", file=sys.stderr, flush=True),
                          exit_now=lambda: f"{prefix()}moe-train: interrupted")
    try:
        run, state = setup(cfg, args.workdir, memory_check=not args.skip_memory_check)
        summary, progress = None, Progress()
        try:
            counts = param_counts(run.cfg.model)
            run.log(
                f"model: {counts['total']:,} parameters, {counts['active']:,} active per token; "
                f"{jax.device_count()} devices; workdir {args.workdir}"
            )
            _, summary = train(run, state, signals=signals, progress=progress)
        finally:  # a run that stopped before its first step leaves the workdir as it found it
            run.close(abandon=progress.steps_done == 0 and (summary is None or "preempted" in summary))
    finally:
        signals.restore()
    if "preempted" in summary:
        return 130 if summary["stopped_by"] == "Ctrl-C" else 0
    if summary.get("nothing_to_do"):
        return 0
    if jax.process_index() == 0:
        w = args.workdir
        trained = f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}"
        print(
            f"done: {trained}, eval loss {summary['eval_loss']:.3f}, {summary['tokens_per_sec'] or 0:,.0f} tokens/s\n"
            f"  checkpoints: {w}/checkpoints   (evaluate: moe-eval --workdir={w}; sample: moe-generate --workdir={w} --prompt='def ')\n"
            f"  metrics:     {w}/metrics.jsonl   (plot: moe-plot --workdir={w})\n"
            f"  tensorboard: tensorboard --logdir {w}/tensorboard"
        )
    return 0
