"""Plot a run's loss curves and throughput from WORKDIR/metrics.jsonl into a PNG.

    python scripts/plot_metrics.py WORKDIR [--out FILE.png]

Top panel: training loss and the loss of every other split (validation) against step. Bottom
panel: training tokens/s. The default output is WORKDIR/metrics.png; the path is printed.
``moe-plot --workdir=WORKDIR`` draws this and the MoE pictures (expert load, dropped fraction).
A resumed run that logged a step twice keeps the later row; an unreadable line is skipped.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from train.analysis.plots import plot_curves  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Plot loss and tokens/s from WORKDIR/metrics.jsonl.")
    parser.add_argument("workdir", type=pathlib.Path, help="run directory holding metrics.jsonl")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="PNG to write (default WORKDIR/metrics.png)")
    args = parser.parse_args(argv)
    metrics_file = args.workdir / "metrics.jsonl"
    if not metrics_file.is_file():
        print(f"{metrics_file}: no such file", file=sys.stderr)
        return 1
    out = args.out or args.workdir / "metrics.png"
    plot_curves(metrics_file, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
