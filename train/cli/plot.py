"""moe-plot: PNGs of a run's loss curves, expert-load heatmaps and dropped fractions."""

from __future__ import annotations

import argparse

from train.cli.common import fail


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
        fail(prog, f"--workdir={args.workdir}: no metrics.jsonl there")
    from train.analysis.plots import plot_run

    for path in plot_run(workdir, pathlib.Path(args.out_dir) if args.out_dir else workdir / "plots"):
        print(path)
    return 0
