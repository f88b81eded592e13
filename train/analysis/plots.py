"""Pictures of a run from WORKDIR/metrics.jsonl (no JAX needed): ``moe-plot --workdir=DIR``.

* ``metrics.png``: training loss with every other split (validation) against step, and tokens/s.
* ``expert_load.png``: one heatmap per MoE layer, expert x step, the share of assignments each
  expert received (``moe/layer<i>/expert_load``); a balanced router is one flat colour.
* ``dropped.png``: the dropped fraction over training, overall and per MoE layer.
* ``routing_health.png``: the router telemetry (``train.services.telemetry``): routing churn between
  logged steps and H(expert | token id), the mean over MoE layers and each layer.

A resumed run that logged a step twice keeps the later row; an unreadable line is skipped.
"""

from __future__ import annotations

import json
import pathlib
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Series = dict[str, tuple[list[int], list]]
LAYER_KEY = re.compile(r"^moe/(layer\d+)/(\w+)$")


def read_rows(path: pathlib.Path) -> dict[str, dict[int, dict]]:
    """{split: {step: row}} from a metrics.jsonl; the last row logged for a step wins. Rows a crash
    cut short or tore (bad JSON, bytes that are not UTF-8) are skipped."""
    rows: dict[str, dict[int, dict]] = {}
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # blank or cut short by a crash
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.setdefault(str(row.get("split", "train")), {})[row["step"]] = row
    return rows


def read_series(path: pathlib.Path, key: str, rows=None) -> Series:
    """{split: (steps, values)} of ``key`` (numbers or lists), sorted by step."""
    out: Series = {}
    for split, by_step in (read_rows(path) if rows is None else rows).items():
        steps = [s for s in sorted(by_step) if isinstance(by_step[s].get(key), (int, float, list))]
        if steps:
            out[split] = (steps, [by_step[s][key] for s in steps])
    return out


def moe_layers(rows) -> list[str]:
    """Names ("layer1", ...) of the MoE layers with per-layer telemetry, in block order."""
    names = {m.group(1) for by_step in rows.values() for row in by_step.values() for k in row if (m := LAYER_KEY.match(k))}
    return sorted(names, key=lambda n: int(n[5:]))


def plot_curves(metrics_file: pathlib.Path, out: pathlib.Path, rows=None) -> None:
    losses = read_series(metrics_file, "loss", rows)
    speed = read_series(metrics_file, "tokens_per_sec", rows).get("train")
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
    _save(fig, out)


def plot_expert_load(metrics_file: pathlib.Path, out: pathlib.Path, rows) -> bool:
    """One heatmap per MoE layer (expert x step); False when the run logged no per-layer load."""
    layers = moe_layers(rows)
    series = {n: read_series(metrics_file, f"moe/{n}/expert_load", rows).get("train") for n in layers}
    series = {n: s for n, s in series.items() if s}
    if not series:
        return False
    fig, axes = plt.subplots(len(series), 1, figsize=(9, 1.2 + 2.2 * len(series)), squeeze=False)
    for ax, (name, (steps, loads)) in zip(axes[:, 0], series.items(), strict=True):
        image = ax.imshow(
            list(map(list, zip(*loads, strict=True))), aspect="auto", origin="lower", cmap="viridis",
            extent=(steps[0], steps[-1], -0.5, len(loads[0]) - 0.5), interpolation="nearest",
        )
        ax.set_ylabel(f"{name}\nexpert")
        fig.colorbar(image, ax=ax, label="share of assignments")
    axes[0, 0].set_title(f"expert load over training: {metrics_file.parent.name}")
    axes[-1, 0].set_xlabel("step")
    _save(fig, out)
    return True


def _overall_and_layers(ax, metrics_file: pathlib.Path, rows, key: str, label: str) -> bool:
    """``moe/<key>`` (thick) and each layer's ``moe/<layer>/<key>`` against step on ``ax``."""
    overall = read_series(metrics_file, f"moe/{key}", rows).get("train")
    if not overall:
        return False
    ax.plot(*overall, color="black", linewidth=1.5, label="all MoE layers")
    for name in moe_layers(rows):
        layer = read_series(metrics_file, f"moe/{name}/{key}", rows).get("train")
        if layer:
            ax.plot(*layer, linewidth=0.8, label=name)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return True


def plot_dropped(metrics_file: pathlib.Path, out: pathlib.Path, rows) -> bool:
    fig, ax = plt.subplots(figsize=(8, 3.6))
    if not _overall_and_layers(ax, metrics_file, rows, "dropped_fraction", "dropped fraction"):
        plt.close(fig)
        return False
    ax.set_xlabel("step")
    _save(fig, out)
    return True


def plot_routing_health(metrics_file: pathlib.Path, out: pathlib.Path, rows) -> bool:
    """Churn and H(expert | token id) against step; False when the run logged no router probe."""
    fig, (ax_churn, ax_entropy) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    if not _overall_and_layers(ax_entropy, metrics_file, rows, "token_entropy", "H(expert | token id), nats"):
        plt.close(fig)
        return False
    if not _overall_and_layers(ax_churn, metrics_file, rows, "churn", "routing churn"):
        ax_churn.text(0.5, 0.5, "one probe only: no churn yet", ha="center", va="center", transform=ax_churn.transAxes)
    ax_churn.set_title(f"router health on a fixed batch: {metrics_file.parent.name}")
    ax_entropy.set_xlabel("step")
    _save(fig, out)
    return True


def _save(fig, out: pathlib.Path) -> None:
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_run(workdir: pathlib.Path, out_dir: pathlib.Path) -> list[pathlib.Path]:
    """Every picture the run's metrics allow, into ``out_dir``; returns the files written."""
    metrics_file = workdir / "metrics.jsonl"
    rows = read_rows(metrics_file)
    written = [out_dir / "metrics.png"]
    plot_curves(metrics_file, written[0], rows)
    if plot_expert_load(metrics_file, out_dir / "expert_load.png", rows):
        written.append(out_dir / "expert_load.png")
    if plot_dropped(metrics_file, out_dir / "dropped.png", rows):
        written.append(out_dir / "dropped.png")
    if plot_routing_health(metrics_file, out_dir / "routing_health.png", rows):
        written.append(out_dir / "routing_health.png")
    return written
