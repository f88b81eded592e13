"""moe-eval: score a checkpoint on any devices (loss, perplexity, bits per byte)."""

from __future__ import annotations

import argparse
import sys

from moe.config import SCAN_MODES
from train.cli.common import INT32_MAX, Range, check_ranges, check_workdir, common_args, run_guarded, start_jax, stderr_log


def eval_main(argv=None) -> int:
    """moe-eval --workdir=DIR [--step=N] [--data_path=PATH]: a final JSON line on stdout."""
    prog = "moe-eval"
    p = argparse.ArgumentParser(prog=prog, description="Score a checkpoint: loss, perplexity, bits per byte.")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--data_path", default=None,
                   help="score every file here (every token of a prepared folder) instead of the validation split")
    p.add_argument("--max_batches", type=int, default=0, help="stop after this many batches (0 = all)")
    p.add_argument("--scan_layers", choices=SCAN_MODES, default=None,
                   help="run the blocks scanned or unrolled, whichever way the run was trained (default: as trained)")
    common_args(p)
    from sharding.distributed import add_arguments

    add_arguments(p)
    args = p.parse_args(argv)
    check_ranges(prog, args, {"step": Range(0, INT32_MAX), "max_batches": Range(0, INT32_MAX)})
    check_workdir(prog, args.workdir)
    start_jax(prog, args, distributed=True)

    def run() -> int:
        import json

        from train.inference.evaluate import evaluate_run, load_run

        loaded = load_run(args.workdir, args.step, scan_layers=args.scan_layers,
                          log=stderr_log(prog))
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

    return run_guarded(prog, args.verbose, run)
