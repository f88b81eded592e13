"""Plot a run's loss curves and throughput from WORKDIR/metrics.jsonl into a PNG.

    python scripts/plot_metrics.py WORKDIR [--out FILE.png]

Top panel: training loss and the loss of every other split (validation) against step. Bottom
panel: training tokens/s. The default output is WORKDIR/metrics.png; the path is printed.
A resumed run that logged a step twice keeps the later row; an unreadable line is skipped.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Series = dict[str, tuple[list[int], list[float]]]


def read_series(path: pathlib.Path, key: str) -> Series:
    """{split: (steps, values)} of ``key`` from a metrics.jsonl, sorted by step, last row per step wins."""
    rows: dict[str, dict[int, float]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # blank or cut short by a crash
        value = row.get(key) if isinstance(row, dict) else None
        if isinstance(value, (int, float)) and isinstance(row.get("step"), int):
            rows.setdefault(str(row.get("split", "train")), {})[row["step"]] = float(value)
    return {split: (sorted(by_step), [by_step[s] for s in sorted(by_step)]) for split, by_step in rows.items()}


def plot(metrics_file: pathlib.Path, out: pathlib.Path) -> None:
    losses = read_series(metrics_file, "loss")
    speed = read_series(metrics_file, "tokens_per_sec").get("train")
    fig, (ax_loss, ax_speed) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(2, 1))
    for split in sorted(losses, key=lambda s: (s != "train", s)):
        steps, values = losses[split]
        style = {"linewidth": 1.0} if split == "train" else {"marker": "o", "linewidth": 1.5}
        ax_loss.plot(steps, values, label=f"{split} loss", **style)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(str(metrics_file.parent.name or metrics_file.parent))
    ax_loss.grid(alpha=0.3)
    if losses:
        ax_loss.legend()
    if speed:
        ax_speed.plot(*speed, color="tab:green", linewidth=1.0)
    else:
        ax_speed.text(0.5, 0.5, "no tokens_per_sec logged", ha="center", va="center", transform=ax_speed.transAxes)
    ax_speed.set_ylabel("tokens / s")
    ax_speed.set_xlabel("step")
    ax_speed.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


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
    plot(metrics_file, out)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
