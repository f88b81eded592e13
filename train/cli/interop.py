"""moe-import / moe-export: Hugging Face model folders in and out (``train.interop``)."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

from moe.config import DTYPES
from train.cli.common import (Range, check_ranges, check_workdir, common_args, fail, run_guarded, split_overrides,
                              start_jax)


def import_main(argv=None) -> int:
    """moe-import --hf_dir=DIR --workdir=W: a Switchyard workdir from a local Hugging Face model."""
    prog = "moe-import"
    p = argparse.ArgumentParser(prog=prog, description=(
        "Convert a local Hugging Face MoE model folder (config.json, safetensors, tokenizer.json) of "
        "mixtral, qwen2_moe, qwen3_moe, olmoe or deepseek_v3 into a Switchyard workdir (checkpoint 0)."))
    p.add_argument("--hf_dir", required=True, help="the model folder (as save_pretrained writes it)")
    p.add_argument("--workdir", help="a new folder for the Switchyard run (not with --plan)")
    p.add_argument("--allow_unused", action="store_true",
                   help="import even when the folder holds tensors the config does not use (they are listed)")
    p.add_argument("--plan", action="store_true",
                   help="read config.json alone (no weights, no tokenizer) and print what each device needs to train "
                        "the model on the mesh of --config.mesh.* (emulated with --cpu_devices), as moe-train --plan "
                        "does: the last line is JSON; exit 3 if it does not fit")
    p.add_argument("--device_memory_gb", type=float, default=None,
                   help="with --plan: the memory of one device (GiB) to check the plan against")
    common_args(p)
    args, rest = p.parse_known_args(argv)
    overrides = split_overrides(rest, prog)
    check_ranges(prog, args, {"device_memory_gb": Range(0, 1 << 20, low_open=True, unit=" GiB")})
    if args.plan:
        if "://" in args.hf_dir:
            fail(prog, f"--hf_dir={args.hf_dir}: URLs are not supported; give a local (or mounted) folder")
        if args.workdir:
            fail(prog, f"--workdir={args.workdir}: --plan writes nothing; leave it out")
        start_jax(prog, args)
        return run_guarded(prog, args.verbose, lambda: _plan(pathlib.Path(args.hf_dir), overrides, args.device_memory_gb))
    if overrides:
        fail(prog, f"--config.{overrides[0][0]}: goes with --plan")
    if args.device_memory_gb is not None:
        fail(prog, f"--device_memory_gb={args.device_memory_gb}: goes with --plan")
    if not args.workdir:
        fail(prog, "--workdir: required (a new folder for the Switchyard run)")
    absolute_paths(prog, args)
    args.cpu_devices = 1  # the conversion places each array once
    start_jax(prog, args)

    def run(log):
        from train.interop.hf_import import import_model

        return import_model(args.hf_dir, args.workdir, allow_unused=args.allow_unused, log=log)

    return _run(prog, args, run)


def export_main(argv=None) -> int:
    """moe-export --workdir=W --hf_dir=OUT [--step=N]: a Hugging Face model folder from a checkpoint."""
    from train.interop.families import ARCHITECTURES

    prog = "moe-export"
    p = argparse.ArgumentParser(prog=prog, description=(
        "Write a checkpoint as a Hugging Face model folder (safetensors shards, config.json, tokenizer) "
        "that transformers.AutoModelForCausalLM.from_pretrained loads."))
    p.add_argument("--workdir", required=True, help="the Switchyard run to export")
    p.add_argument("--hf_dir", required=True, help="a new folder for the Hugging Face model")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--arch", choices=ARCHITECTURES, default="",
                   help="the Hugging Face architecture (default: the one imported from, else inferred from the model)")
    p.add_argument("--dtype", choices=DTYPES, default="", help="tensor dtype (default: the parameters')")
    p.add_argument("--max_shard_gb", type=float, default=2.0, help="largest safetensors file (GiB)")
    common_args(p)
    args = p.parse_args(argv)
    check_ranges(prog, args, {"step": Range(0, 2**31 - 1), "max_shard_gb": Range(0, 1 << 20, low_open=True)})
    absolute_paths(prog, args)
    start_jax(prog, args)

    def run(log):
        from train.interop.hf_export import export_model

        return export_model(args.workdir, args.hf_dir, step=args.step, arch=args.arch, dtype=args.dtype,
                            max_shard_gb=args.max_shard_gb, log=log)

    return _run(prog, args, run)


def _plan(hf_dir: pathlib.Path, overrides: list[tuple[str, str]], device_memory_gb: float | None) -> int:
    """``moe-import --plan``: the imported config with the overrides, planned as ``moe-train --plan``."""
    from train.cli.train import print_plan
    from train.core.config import apply_override, validate
    from train.interop.hf_import import import_config

    _, _, cfg = import_config(hf_dir)
    for key, value in overrides:
        apply_override(cfg, key, value)
    validate(cfg)
    return print_plan(cfg, device_memory_gb)


def absolute_paths(prog: str, args) -> None:
    """``--hf_dir`` and ``--workdir`` as absolute paths (Orbax refuses relative ones), from the current
    folder; a URL is refused (it would become a local folder)."""
    check_workdir(prog, args.workdir)
    if "://" in args.hf_dir:
        fail(prog, f"--hf_dir={args.hf_dir}: URLs are not supported; give a local (or mounted) folder")
    args.hf_dir, args.workdir = os.path.abspath(args.hf_dir), os.path.abspath(args.workdir)


def _run(prog: str, args, convert) -> int:
    """``convert(log)`` guarded (one-line errors), progress on stderr, its summary as the last stdout line (JSON)."""

    def run() -> int:
        summary = convert(lambda m: print(m, file=sys.stderr, flush=True))
        print(json.dumps(summary), flush=True)
        return 0

    return run_guarded(prog, args.verbose, run)
