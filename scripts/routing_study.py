"""The routing study: the same model, data, seed, steps and active FLOPs under every router.

    python scripts/routing_study.py [--quick] [--out runs/routing_study] [--steps N] [--routers a,b,...]
                                    [--seeds N] [--config.KEY=VALUE ...]   # passed to every moe-train

Trains ``configs/default.py`` (and its dense baseline) once per router with ``moe-train``, scores
each final checkpoint with ``moe-eval`` on the validation split, and writes into OUT:
``results.md`` (the table), ``results.json``, ``loss.png`` (training loss of every variant) and
``eval.png`` (validation loss per variant). Each variant is its own process, so a failure is
reported and the study goes on. ``--quick`` (fewer steps and bytes) takes about 10 minutes on
2 cores. Top-2 routers (gshard) use experts half as wide, so every variant has the same active
FLOPs per token. ``expert_choice`` is not in the study: it routes by later tokens, so its loss
is not a causal language-model loss and would not compare.

``--seeds N`` trains every variant N times (``train.seed`` 0..N-1: initialisation, data order and
routing draws all change) into ``OUT/<variant>/seed<i>`` and reports the mean and the spread
(sample standard deviation, and the range) over seeds, so a difference can be told from noise;
with ``dense`` in the study each variant's paired gap to it (seed i against seed i) too. A
variant whose run is already complete in OUT is not trained again (moe-train resumes at its last
step), only scored: a study can grow one variant at a time.
Every variant also reports its router health at the end of training, from the run's own
telemetry (``moe/churn``, ``moe/token_entropy``; see the README).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from train.analysis.plots import read_rows, read_series  # noqa: E402

# name -> (config file, overrides); the published contrast each one stands for is in the README
VARIANTS = {
    "dense": ("configs/dense_baseline.py", []),
    "topk": ("configs/default.py", ["--config.model.moe.router=topk"]),
    "balanced_hash": ("configs/default.py", ["--config.model.moe.router=balanced_hash"]),
    "hash": ("configs/default.py", ["--config.model.moe.router=hash"]),
    "bigram_hash": ("configs/default.py", ["--config.model.moe.router=bigram_hash"]),
    "random": ("configs/default.py", ["--config.model.moe.router=random"]),
    "frozen": ("configs/default.py", ["--config.model.moe.router=frozen"]),
    "gshard": ("configs/default.py", ["--config.model.moe.router=gshard", "--config.model.moe.experts_per_token=2",
                                      "--config.model.moe.expert_d_ff=256"]),
    # learned top-2 (Mixtral-style) with experts half as wide: the same active FLOPs as top-1
    "topk2": ("configs/default.py", ["--config.model.moe.router=topk", "--config.model.moe.experts_per_token=2",
                                     "--config.model.moe.expert_d_ff=256"]),
    "loss_free": ("configs/default.py", ["--config.model.moe.router=loss_free"]),
    "thor": ("configs/default.py", ["--config.model.moe.router=thor"]),
    # THOR with its consistency loss: two forward passes per step (same active FLOPs per pass)
    "thor_cr": ("configs/default.py", ["--config.model.moe.router=thor", "--config.model.moe.router_options.thor.consistency=1.0"]),
    # StableMoE: learned routing, then the distilled token -> expert table frozen (model.moe.router_options.stable.freeze_step)
    "stable": ("configs/default.py", ["--config.model.moe.router=stable"]),
}


def run_variant(name: str, workdir: pathlib.Path, common: list[str], cpu_devices: int, log) -> dict:
    """Train and score one variant into ``workdir``: its row, or ``{"name", "error"}``."""
    config, overrides = VARIANTS[name]
    python = sys.executable
    train = [python, "-m", "train", f"--config={ROOT / config}", f"--workdir={workdir}",
             f"--cpu_devices={cpu_devices}", *common, *overrides]
    start = time.perf_counter()
    before = workdir / "summary.json"  # a complete run is only scored again: keep its measured speed
    earlier = json.loads(before.read_text()) if before.is_file() else {}
    done = subprocess.run(train, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        log(f"{name}: moe-train failed ({done.returncode}): {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        return {"name": name, "error": "train"}
    score = subprocess.run([python, "-c", "import sys; from train.cli import eval_main; sys.exit(eval_main())",
                            f"--workdir={workdir}", f"--cpu_devices={cpu_devices}"],
                           cwd=ROOT, capture_output=True, text=True)
    if score.returncode:
        log(f"{name}: moe-eval failed: {(score.stderr.strip().splitlines() or ['?'])[-1]}")
        return {"name": name, "error": "eval"}
    result = json.loads(score.stdout.strip().splitlines()[-1])
    summary = json.loads((workdir / "summary.json").read_text())
    rows = read_rows(workdir / "metrics.jsonl")
    train_rows = [rows["train"][s] for s in sorted(rows.get("train", {}))]
    late = train_rows[len(train_rows) * 4 // 5:] or train_rows  # the last fifth of training

    def late_mean(key):
        values = [r[key] for r in late if isinstance(r.get(key), (int, float))]
        return statistics.mean(values) if values and name != "dense" else None

    row = {
        "name": name,
        "eval_loss": result["loss"],
        "bits_per_byte": result["bits_per_byte"],
        "load_imbalance": late_mean("moe/load_imbalance"),
        "dropped_fraction": late_mean("moe/dropped_fraction"),
        "churn": late_mean("moe/churn"),
        "token_entropy": late_mean("moe/token_entropy"),
        "tokens_per_sec": summary.get("tokens_per_sec") or earlier.get("tokens_per_sec"),
        "minutes": (time.perf_counter() - start) / 60,
    }
    log(f"{workdir.relative_to(workdir.parents[1]) if name != workdir.name else name}: eval loss "
        f"{row['eval_loss']:.4f}, {row['bits_per_byte']:.3f} bits/byte ({row['minutes']:.1f} min)")
    return row


NUMBERS = ("eval_loss", "bits_per_byte", "load_imbalance", "dropped_fraction", "churn", "token_entropy", "tokens_per_sec")


def aggregate(name: str, runs: list[dict]) -> dict:
    """One variant's row over its seeds: the mean of every number, and the eval loss's spread
    (sample standard deviation ``eval_loss_std``, 0 for one seed; ``eval_loss_min``/``_max``);
    ``seeds`` keeps every seed's own row. A seed that failed fails the variant."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return {"name": name, "error": failed[0]["error"], "seeds": runs}
    row: dict = {"name": name}
    for key in NUMBERS:
        values = [r[key] for r in runs if r.get(key) is not None]
        row[key] = statistics.mean(values) if values else None
    losses = [r["eval_loss"] for r in runs]
    row["eval_loss_std"] = statistics.stdev(losses) if len(losses) > 1 else 0.0
    row["eval_loss_min"], row["eval_loss_max"] = min(losses), max(losses)
    row["minutes"] = sum(r["minutes"] for r in runs)
    row["seeds"] = runs
    return row


def _fmt(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def paired_gap(row: dict, baseline: dict | None) -> tuple[float, float] | None:
    """Mean and standard deviation over seeds of (this variant's eval loss - the baseline's with
    the same seed): seed i gives both the same data order, so the pairing cancels part of the noise."""
    if baseline is None or "error" in baseline or "error" in row or len(row["seeds"]) < 2 \
            or len(row["seeds"]) != len(baseline["seeds"]):
        return None
    gaps = [a["eval_loss"] - b["eval_loss"] for a, b in zip(row["seeds"], baseline["seeds"], strict=True)]
    return statistics.mean(gaps), statistics.stdev(gaps)


def markdown(rows: list[dict], steps: int, seeds: int) -> str:
    many = seeds > 1
    same = (f"{seeds} seeds each: seed i gives every variant the same data order" if many else "the same data, seed")
    dense = next((r for r in rows if r["name"] == "dense"), None)
    paired = many and dense is not None and "error" not in dense
    head = (f"{steps} steps of `configs/default.py` per variant ({same}, and the same active FLOPs per token); "
            "validation loss from `moe-eval` on the whole validation split; load imbalance (max/mean expert load), "
            "dropped fraction, routing churn and H(expert | token) averaged over the last fifth of training"
            f"{'; every column but the spread is a mean over seeds' if many else ''}"
            f"{'; vs dense: the paired gap to dense, seed by seed (negative = better than dense)' if paired else ''}\n\n")
    cols = ["variant", "eval loss (mean ± std)" if many else "eval loss"]
    cols += ["min..max"] if many else []
    cols += ["vs dense (paired)"] if paired else []
    cols += ["bits/byte", "load max/mean", "dropped", "churn", "H(e\\|tok)", "tokens/s"]
    table = "| " + " | ".join(cols) + " |\n|---|" + "---:|" * (len(cols) - 1) + "\n"
    for r in rows:
        if "error" in r:
            table += f"| {r['name']} | failed ({r['error']}) |" + " |" * (len(cols) - 2) + "\n"
            continue
        cells = [r["name"], f"{r['eval_loss']:.4f}" + (f" ± {r['eval_loss_std']:.4f}" if many else "")]
        cells += [f"{r['eval_loss_min']:.4f}..{r['eval_loss_max']:.4f}"] if many else []
        if paired:
            gap = paired_gap(r, dense) if r is not dense else None
            cells.append("-" if gap is None else f"{gap[0]:+.4f} ± {gap[1]:.4f}")
        cells += [f"{r['bits_per_byte']:.3f}", _fmt(r["load_imbalance"], "{:.2f}"), _fmt(r["dropped_fraction"], "{:.3f}"),
                  _fmt(r["churn"], "{:.3f}"), _fmt(r["token_entropy"], "{:.3f}"), _fmt(r["tokens_per_sec"], "{:,.0f}")]
        table += "| " + " | ".join(cells) + " |\n"
    return head + table


def workdir_of(out: pathlib.Path, name: str, seed: int, seeds: int) -> pathlib.Path:
    return out / name if seeds == 1 else out / name / f"seed{seed}"


def mean_loss_curve(out: pathlib.Path, row: dict):
    """(steps, training loss averaged over the variant's seeds at the steps they all logged)."""
    seeds = len(row["seeds"])
    curves = [read_series(workdir_of(out, row["name"], i, seeds) / "metrics.jsonl", "loss").get("train")
              for i in range(seeds)]
    if not all(curves):
        return None
    steps = sorted(set.intersection(*(set(c[0]) for c in curves)))
    values = [dict(zip(*c)) for c in curves]
    return steps, [statistics.mean(v[s] for v in values) for s in steps]


def plots(rows: list[dict], out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    palette = plt.get_cmap("tab20").colors  # dark shades first, then light ones: 20 distinct lines
    for n, r in enumerate(rows):
        series = mean_loss_curve(out, r) if "error" not in r else None
        if series:
            steps, losses = series
            smooth = [statistics.mean(losses[max(0, i - 4):i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, linewidth=1.0, label=r["name"], color=palette[(2 * n) % 20 + (2 * n) // 20 % 2],
                    linestyle="--" if r["name"] == "dense" else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (5-log moving mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    ok = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    ax.bar([r["name"] for r in ok], [r["eval_loss"] for r in ok], yerr=[r["eval_loss_std"] for r in ok], capsize=3,
           color=["grey" if r["name"] == "dense" else "tab:blue" for r in ok])
    low = min(r["eval_loss"] for r in ok)
    ax.set_ylim(low * 0.97, max(r["eval_loss"] + r["eval_loss_std"] for r in ok) * 1.01)
    ax.set_ylabel("validation loss")
    ax.tick_params(axis="x", rotation=30)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "eval.png", dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/routing_study", help="output folder")
    p.add_argument("--quick", action="store_true", help="about 10 minutes on 2 cores")
    p.add_argument("--steps", type=int, default=0, help="training steps per variant (default 600, quick 150)")
    p.add_argument("--routers", default=",".join(VARIANTS), help="comma-separated variants to run")
    p.add_argument("--seeds", type=int, default=1, help="seeds per variant (train.seed 0..N-1); mean and spread")
    p.add_argument("--cpu_devices", type=int, default=8)
    args, extra = p.parse_known_args(argv)
    bad = [a for a in extra if not a.startswith("--config.")]
    if bad:
        p.error(f"{bad[0]}: unrecognised argument")
    names = [n for n in args.routers.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"--routers: unknown {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    if args.seeds < 1:
        p.error(f"--seeds={args.seeds}: must be at least 1")
    steps = args.steps or (150 if args.quick else 600)
    common = [f"--config.train.steps={steps}", "--config.eval_every_steps=0", "--config.checkpoint.every_steps=0",
              "--config.log_every_steps=5", f"--config.optimizer.warmup_steps={max(1, steps // 20)}"]
    if args.quick:
        common.append("--config.data.max_bytes=2000000")
    common += extra
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = lambda m: print(m, flush=True)  # noqa: E731
    rows = []
    for name in names:
        runs = [run_variant(name, workdir_of(out, name, seed, args.seeds),
                            [*common, f"--config.train.seed={seed}"] if args.seeds > 1 else common, args.cpu_devices, log)
                for seed in range(args.seeds)]
        rows.append(aggregate(name, runs))
        if args.seeds > 1 and "error" not in rows[-1]:
            r = rows[-1]
            log(f"{name}: eval loss {r['eval_loss']:.4f} ± {r['eval_loss_std']:.4f} over {args.seeds} seeds")
    table = markdown(rows, steps, args.seeds)
    (out / "results.md").write_text(table)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    if any("error" not in r for r in rows):
        plots(rows, out)
    print(table)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'loss.png'}, {out / 'eval.png'}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
