"""Command-line entry points. Thin: parse, set up the devices, call the library.

JAX is imported only after the device count is set, since XLA reads it when its backend starts.
"""

from __future__ import annotations

import argparse
import math
import os
import sys


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _split_overrides(rest: list[str], prog: str) -> list[tuple[str, str]]:
    """``--config.a.b=v`` or ``--config.a.b v`` pairs; anything else is an error."""
    out, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--config."):
            _fail(prog, f"{arg}: unrecognised argument")
        key, eq, value = arg[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                _fail(prog, f"{arg}: missing value")
            value, i = rest[i + 1], i + 1
        out.append((key, value))
        i += 1
    return out


def _fail(prog: str, message: str, code: int = 2):
    from sharding.distributed import prefix

    print(f"{prefix()}{prog}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _check_workdir(prog: str, workdir: str) -> None:
    """Run folders are paths; an object-store URL would silently become a local folder."""
    if "://" in workdir:
        _fail(prog, f"--workdir={workdir}: URLs are not supported; mount the bucket on every host "
                    "(e.g. Cloud Storage FUSE at /mnt/gcs) and pass that path")


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu_devices", type=int, default=8, help="CPU devices to emulate when no accelerator is used")
    p.add_argument("--verbose", action="store_true", help="show tracebacks")


def train_main(argv=None) -> int:
    """moe-train --config=configs/default.py --workdir=DIR [--config.KEY=VALUE ...]"""
    prog = "moe-train"
    p = argparse.ArgumentParser(prog=prog, description="Train a sparse MoE language model.")
    p.add_argument("--config", required=True, help="a configs/*.py file defining get_config()")
    p.add_argument("--workdir", required=True, help="run folder: config, logs, checkpoints")
    p.add_argument("--dry_run", action="store_true", help="validate and print the config and parameter counts")
    p.add_argument("--skip_memory_check", action="store_true",
                   help="start even when a step's estimated memory exceeds what the devices have")
    _common_args(p)
    from sharding.distributed import add_arguments

    add_arguments(p)
    args, rest = p.parse_known_args(argv)
    _check_workdir(prog, args.workdir)
    cfg = _load_config(prog, args.config, _split_overrides(rest, prog))
    _start_jax(prog, args, distributed=True)
    return _run_guarded(prog, args.verbose, lambda: _train(cfg, args))


def _load_config(prog: str, path: str, overrides: list[tuple[str, str]]):
    """The config file with ``--config.KEY=VALUE`` overrides applied, validated; one line on error."""
    from train.config import ConfigError, apply_override, load_config_file, validate

    try:
        cfg = load_config_file(path)
        for key, value in overrides:
            apply_override(cfg, key, value)
        validate(cfg)
    except ConfigError as e:
        _fail(prog, str(e))
    return cfg


def _run_guarded(prog: str, verbose: bool, fn) -> int:
    """Run ``fn``; user-caused errors become one line and exit code 2, a run that cannot go on
    (no readable checkpoint, too many non-finite steps) one line and exit code 1; --verbose
    shows the traceback."""
    from train.checkpoint import CheckpointError
    from train.config import ConfigError
    from train.data import DataError
    from train.loop import NonFiniteError
    from train.workdir import WorkdirError

    from sharding.distributed import shutdown

    try:
        return fn()
    except (ConfigError, DataError, WorkdirError, CheckpointError, NonFiniteError) as e:
        if verbose:
            raise
        _fail(prog, str(e), 2 if isinstance(e, (ConfigError, DataError, WorkdirError)) else 1)
    except KeyboardInterrupt:  # end now: an orderly exit could wait on threads a cut-short save left behind
        from sharding.distributed import prefix

        sys.stdout.flush()
        print(f"{prefix()}{prog}: interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    except Exception as e:
        from sharding.distributed import prefix

        if not prefix():  # one process: the traceback is the report
            raise
        # Several processes: a failed collective usually means a peer died. A graceful
        # jax.distributed shutdown would wait for that peer at a barrier, so report and leave now.
        import traceback

        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"{prefix()}{prog}: {type(e).__name__}: {first}; stopping without waiting for the other processes",
              file=sys.stderr, flush=True)
        os._exit(1)
    finally:
        shutdown()


def _train(cfg, args) -> int:
    import jax

    from train.config import validate_mesh
    from train.loop import Trainer, param_counts, resolve_model

    sizes = validate_mesh(cfg, jax.device_count())
    if args.dry_run:
        from train.tokenizer import ByteTokenizer

        resolved = cfg if cfg.model.vocab_size or cfg.data.tokenizer != "byte" else resolve_model(cfg, ByteTokenizer().vocab_size)
        print(resolved.to_json())
        mesh = " x ".join(f"{k}={v}" for k, v in sizes.items())
        print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; mesh {mesh}; rules {cfg.mesh.rules}")
        note = ""
        if not resolved.model.vocab_size:  # a BPE trained at start: at most data.bpe_vocab_size tokens
            resolved = resolve_model(cfg, cfg.data.bpe_vocab_size)
            note = f" (vocabulary {resolved.model.vocab_size} from data.bpe_vocab_size; the trained BPE may be smaller)"
        counts = param_counts(resolved.model)
        print(f"parameters: {counts['total']:,} total, {counts['active']:,} active per token{note}")
        return 0
    from sharding.distributed import prefix
    from train.signals import StopSignals

    signals = StopSignals(lambda m: print(f"{prefix()}{m}", file=sys.stderr, flush=True),
                          exit_now=lambda: f"{prefix()}moe-train: interrupted")
    try:
        trainer = Trainer(cfg, args.workdir, memory_check=not args.skip_memory_check)
        summary = None
        try:
            counts = param_counts(trainer.cfg.model)
            trainer.log(
                f"model: {counts['total']:,} parameters, {counts['active']:,} active per token; "
                f"{jax.device_count()} devices; workdir {args.workdir}"
            )
            summary = trainer.run(signals=signals)
        finally:  # a run that stopped before its first step leaves the workdir as it found it
            trainer.close(abandon=trainer.steps_done == 0 and (summary is None or "preempted" in summary))
    finally:
        signals.restore()
    if "preempted" in summary:
        return 130 if summary["stopped_by"] == "Ctrl-C" else 0
    if jax.process_index() == 0:
        w = args.workdir
        trained = (
            f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}"
            if summary["first_loss"] is not None
            else f"already trained to step {trainer.cfg.train.steps}"
        )
        print(
            f"done: {trained}, eval loss {summary['eval_loss']:.3f}, {summary['tokens_per_sec'] or 0:,.0f} tokens/s\n"
            f"  checkpoints: {w}/checkpoints   (evaluate: moe-eval --workdir={w}; sample: moe-generate --workdir={w} --prompt='def ')\n"
            f"  metrics:     {w}/metrics.jsonl   (plot: moe-plot --workdir={w})\n"
            f"  tensorboard: tensorboard --logdir {w}/tensorboard"
        )
    return 0


def _start_jax(prog: str, args, distributed: bool = False) -> None:
    """Set the CPU device count, then (multi-process jobs) start jax.distributed: in that order."""
    import logging

    # Orbax logs informational warnings, and every failure of a background save as tracebacks from
    # several threads; the run reports such a failure itself, in one line (--verbose shows them)
    logging.getLogger("absl").setLevel(logging.ERROR if args.verbose else logging.CRITICAL)
    if args.cpu_devices < 1:
        _fail(prog, f"--cpu_devices={args.cpu_devices}: must be >= 1")
    from sharding.mesh import emulate_cpu_devices

    emulate_cpu_devices(args.cpu_devices)
    if distributed:
        from sharding import distributed as dist

        try:
            dist.initialize(dist.settings_from(args))
        except dist.DistributedError as e:
            print(f"{prog}: {e}", file=sys.stderr, flush=True)
            raise SystemExit(3) from None


def eval_main(argv=None) -> int:
    """moe-eval --workdir=DIR [--step=N] [--data_path=PATH]: a final JSON line on stdout."""
    prog = "moe-eval"
    p = argparse.ArgumentParser(prog=prog, description="Score a checkpoint: loss, perplexity, bits per byte.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--data_path", default=None, help="score every file here instead of the validation split")
    p.add_argument("--max_batches", type=int, default=0, help="stop after this many batches (0 = all)")
    _common_args(p)
    from sharding.distributed import add_arguments

    add_arguments(p)
    args = p.parse_args(argv)
    _check_workdir(prog, args.workdir)
    _start_jax(prog, args, distributed=True)

    def run() -> int:
        import json

        from train.evaluate import evaluate_run, load_run

        loaded = load_run(args.workdir, args.step)
        m = loaded.cfg.model
        if m.non_causal_routing:
            print(f"{prog}: note: {m.non_causal_message()}; this loss is not a causal language-model loss",
                  file=sys.stderr)
        result = evaluate_run(
            loaded, data_path=args.data_path, max_batches=args.max_batches, log=lambda m: print(m, file=sys.stderr)
        )
        import jax

        if jax.process_index() == 0:
            print(json.dumps(result), flush=True)
        return 0

    return _run_guarded(prog, args.verbose, run)


def generate_main(argv=None) -> int:
    """moe-generate --workdir=DIR --prompt=TEXT: sampled text on stdout."""
    prog = "moe-generate"
    p = argparse.ArgumentParser(prog=prog, description="Sample text from a checkpoint (KV-cached decoding).")
    p.add_argument("--workdir", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (deterministic)")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k most likely tokens (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    _common_args(p)
    args = p.parse_args(argv)
    _check_workdir(prog, args.workdir)
    for name in ("max_new_tokens", "top_k"):
        if getattr(args, name) < (1 if name == "max_new_tokens" else 0):
            _fail(prog, f"--{name}={getattr(args, name)}: out of range")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        _fail(prog, f"--temperature={args.temperature}: must be a finite number >= 0 (0 = greedy)")
    _start_jax(prog, args)

    def run() -> int:
        import jax

        from train.config import ConfigError
        from train.evaluate import load_run, require_tokens
        from train.generate import generate
        from train.tokenizer import build_tokenizer

        loaded = load_run(args.workdir, args.step, devices=jax.devices()[:1])  # one sequence: one device
        m = loaded.cfg.model
        if m.non_causal_routing:
            raise ConfigError(f"{m.non_causal_message()} (checkpoint {loaded.workdir}): it needs later tokens, which "
                              "token-by-token generation does not have")
        if m.eval_capacity_factor and m.moe_every:
            print(f"{prog}: note: model.eval_capacity_factor={m.eval_capacity_factor} applies to scoring; generation "
                  "never drops tokens", file=sys.stderr)
        tokenizer = build_tokenizer(loaded.cfg.data, loaded.workdir, lambda: iter(()))
        if args.top_k > tokenizer.vocab_size:
            raise ConfigError(f"--top_k={args.top_k}: more than the {tokenizer.vocab_size} tokens of the vocabulary")
        prompt = require_tokens(tokenizer, args.prompt)
        positions, trained = len(prompt) + args.max_new_tokens, loaded.cfg.train.seq_len
        if positions > trained:
            print(f"{prog}: note: the prompt and --max_new_tokens={args.max_new_tokens} reach position {positions}, "
                  f"past the {trained} positions the model was trained on (train.seq_len); what it writes there "
                  "was never trained", file=sys.stderr)
        with loaded.context():
            ids, _ = generate(
                loaded.model(), prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                seed=args.seed, stop_id=tokenizer.eos_id,
            )
        print(args.prompt + tokenizer.decode(ids))
        return 0

    return _run_guarded(prog, args.verbose, run)


def plot_main(argv=None) -> int:
    """moe-plot --workdir=DIR [--out_dir=DIR]: PNGs of a run's curves, expert load and drops."""
    import pathlib

    prog = "moe-plot"
    p = argparse.ArgumentParser(prog=prog, description="Draw a run's loss curves, expert-load heatmaps and drops.")
    p.add_argument("--workdir", required=True, help="run folder holding metrics.jsonl")
    p.add_argument("--out_dir", help="where the PNGs go (default WORKDIR/plots)")
    args = p.parse_args(argv)
    workdir = pathlib.Path(args.workdir)
    if not (workdir / "metrics.jsonl").is_file():
        _fail(prog, f"--workdir={args.workdir}: no metrics.jsonl there")
    from train.plots import plot_run

    for path in plot_run(workdir, pathlib.Path(args.out_dir) if args.out_dir else workdir / "plots"):
        print(path)
    return 0


def bench_main(argv=None) -> int:
    """moe-bench layer [...] | moe-bench train [...] (no subcommand: layer)."""
    from train.bench_cli import bench_layer_main, bench_train_main

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        return bench_train_main(argv[1:])
    return bench_layer_main(argv[1:] if argv[:1] == ["layer"] else argv)

