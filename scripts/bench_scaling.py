"""Scaling benchmarks on the emulated CPU mesh (README, "Scaling up"): depth, rematerialisation and
plans of the GPU configs. Every figure comes from a fresh process; medians over --repeats.

    python scripts/bench_scaling.py depth   [--layers 4,16,48] [--repeats 1]
        2-step runs of configs/default.py at each depth, blocks unrolled and scanned: wall time to
        exit and peak RSS of the process, and the training step's compile time (``--plan``).
    python scripts/bench_scaling.py remat   [--layers 16] [--batch 16,64]
        XLA's temporary bytes per device of the training step for every model.remat policy.
    python scripts/bench_scaling.py gpu
        ``moe-train --plan`` of configs/gpu_1b.py (8 devices) and configs/gpu_multihost.py (32).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TRAIN = str(pathlib.Path(sys.executable).parent / "moe-train")


def run(args: list[str]) -> str:
    """stdout of one moe-train process (exit 0, or 3: a plan that does not fit)."""
    proc = subprocess.run([TRAIN, *args], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "XLA_FLAGS": ""})
    if proc.returncode not in (0, 3):
        sys.exit(f"moe-train {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return proc.stdout


def plan(config: str, *extra: str) -> dict:
    return json.loads(run([f"--config={config}", "--plan", *extra]).strip().splitlines()[-1])


def fresh_rss(args: list[str]) -> tuple[float, float]:
    """(wall s, peak RSS GiB) of one moe-train process (its own rusage, from wait4)."""
    start = time.perf_counter()
    proc = subprocess.Popen([TRAIN, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "XLA_FLAGS": ""})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"moe-train {' '.join(args)} failed: {proc.stderr.read()[-2000:]}")
    return wall, usage.ru_maxrss / 2**20


def depth(layers: list[int], repeats: int) -> None:
    print("| layers | blocks | 2-step run, wall | peak RSS | step compile (`--plan`) |")
    print("|---:|---|---:|---:|---:|")
    for n in layers:
        for scan in ("off", "on"):
            common = ["--config=configs/default.py", f"--config.model.num_layers={n}", f"--config.model.scan_layers={scan}"]
            walls, rss, compiles = [], [], []
            for _ in range(repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    wall, peak = fresh_rss([*common, f"--workdir={tmp}/run", "--config.train.steps=2",
                                            "--config.checkpoint.every_steps=0", "--config.eval_batches=1"])
                walls.append(wall)
                rss.append(peak)
                compiles.append(plan("configs/default.py", *common[1:])["compile_s"])
            name = "unrolled" if scan == "off" else "scanned"
            print(f"| {n} | {name} | {statistics.median(walls):.1f} s | {statistics.median(rss):.2f} GiB | "
                  f"{statistics.median(compiles):.1f} s |", flush=True)


def remat(layers: int, batches: list[int]) -> None:
    from moe.config import REMAT_POLICIES

    print(f"| model.remat ({layers} layers, scanned) | batch | temporaries per device | of which beyond the gradients "
          "| vs none | total per device |")
    print("|---|---:|---:|---:|---:|---:|")
    for batch in batches:
        base = None
        for policy in REMAT_POLICIES:
            p = plan("configs/default.py", f"--config.model.num_layers={layers}", "--config.model.scan_layers=on",
                     f"--config.model.remat={policy}", f"--config.train.batch_size={batch}")
            base = base or p["temp_bytes"]
            beyond = p["temp_bytes"] - p["gradient_bytes"]
            print(f"| {policy} | {batch} x 128 | {p['temp_bytes'] / 2**20:.1f} MiB | {beyond / 2**20:.1f} MiB | "
                  f"{p['temp_bytes'] / base:.2f} | {p['total_bytes'] / 2**20:.1f} MiB |", flush=True)


def gpu() -> None:
    for config, devices in (("configs/gpu_1b.py", 8), ("configs/gpu_multihost.py", 32)):
        out = run([f"--config={config}", "--plan", f"--cpu_devices={devices}", "--device_memory_gb=141"])
        print(f"$ moe-train --config={config} --plan --cpu_devices={devices} --device_memory_gb=141")
        print(out.strip(), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=("depth", "remat", "gpu"))
    p.add_argument("--layers", default=None)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--batch", default="16,64", help="remat: global batch sizes (sequences of 128 tokens)")
    args = p.parse_args()
    if args.part == "depth":
        depth([int(v) for v in (args.layers or "4,16,48").split(",")], args.repeats)
    elif args.part == "remat":
        remat(int(args.layers or 16), [int(v) for v in args.batch.split(",")])
    else:
        gpu()


if __name__ == "__main__":
    main()
