"""Start-up cost of the data: raw ``.jsonl`` (read and tokenized at every start) against a prepared folder.

    python scripts/bench_data.py [--sizes_mb 25,100,400] [--repeats 2] [--tmp /tmp/switchyard_bench_data]
                                 [--file_mb 5] [--workers N] [--keep] [--config.KEY=VALUE ...]

For each size, writes a ``.jsonl`` corpus of that many MB (``--file_mb`` per file; each document
one of the running Python's standard library ``*.py`` files, repeated in a fixed order) under
``--tmp`` (outside the repository), prepares it once with ``moe-data prepare`` (timed, its peak
RSS too), then runs ``--repeats`` times each

    moe-train --config=configs/default.py --config.train.steps=2 --config.data.max_bytes=0
              --config.checkpoint.every_steps=0 --config.log_every_steps=1 --config.data.path=CORPUS

once with CORPUS the ``.jsonl`` folder (today's behaviour: the baseline) and once with the prepared
folder, in a fresh workdir each time. Measured per run: the seconds until the first step's log line
(time to first step: start-up, data, compile and one step), the wall seconds to exit, and the peak
resident memory (``/usr/bin/time -v`` when present, else ``getrusage(RUSAGE_CHILDREN)``). Also, in
a process of its own, the data part alone (what ``moe-train`` does before building the model:
``open_run_data``, ``TrainBatches`` and its first batch, the first validation batch): its seconds
and the process's peak RSS. Prints a table of medians and, for the prepared rows, the ratio of the
largest size to the smallest. The machine's other load shows in the times of the whole runs
(compiling dominates them): compare the columns, not the decimals.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
import statistics
import subprocess
import sys
import sysconfig
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
TIME = "/usr/bin/time"
DATA_MAIN = "import sys; from train.cli import data_main; sys.exit(data_main(sys.argv[1:]))"
DATA_ONLY = """
import json, pathlib, resource, sys, tempfile, time
from train.data.config import DataConfig
from train.data.batches import TrainBatches, eval_batches
from train.data.prepared import open_run_data
start = time.perf_counter()
with tempfile.TemporaryDirectory() as work:  # as configs/default.py: batch 16 x 128, byte tokenizer
    data = open_run_data(DataConfig(path=sys.argv[1], max_bytes=0), pathlib.Path(work), log=lambda m: None)
    TrainBatches(data.train.tokens, 128, 16, 0).batch(0)
    eval_batches(data.validation.tokens, 128, 16, 8)[0]
seconds = time.perf_counter() - start
print(json.dumps({"data_s": seconds, "data_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}))
"""


def stdlib_documents() -> list[str]:
    """The standard library's *.py files (sorted), as text: the documents repeated into a corpus."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        if "site-packages" in path.parts or any(p.startswith(".") for p in path.relative_to(root).parts):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.strip():
            docs.append(text)
    return docs


def write_corpus(folder: pathlib.Path, size_mb: int, file_mb: int, docs: list[str]) -> None:
    """``size_mb`` MB of .jsonl in files of ``file_mb`` MB; kept between runs (a marker says it is whole)."""
    marker = folder / ".complete"
    if marker.is_file() and marker.read_text() == f"{size_mb} {file_mb}":
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    target, per_file, written, k, i = size_mb * 10**6, file_mb * 10**6, 0, 0, 0
    while written < target:
        with open(folder / f"part-{k:04d}.jsonl", "w", encoding="utf-8") as f:
            size = 0
            while size < per_file and written + size < target:
                line = json.dumps({"text": docs[i % len(docs)]}) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                i += 1
        written, k = written + size, k + 1
    marker.write_text(f"{size_mb} {file_mb}")


def measured(cmd: list[str], env: dict, first_line: str | None = None) -> dict:
    """Run ``cmd``; its wall seconds, seconds until a stderr line starts with ``first_line``, peak RSS."""
    stats = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_data_time.{os.getpid()}"
    use_time = os.access(TIME, os.X_OK)
    full = [TIME, "-v", "-o", str(stats), *cmd] if use_time else cmd
    start = time.perf_counter()
    proc = subprocess.Popen(full, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict = {"first": None, "tail": []}

    def read() -> None:
        for line in proc.stderr:
            if first_line and seen["first"] is None and line.startswith(first_line):
                seen["first"] = time.perf_counter() - start
            seen["tail"] = (seen["tail"] + [line])[-20:]

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    proc.wait()
    wall = time.perf_counter() - start
    reader.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}):\n{''.join(seen['tail'])}")
    if use_time:
        lines = stats.read_text().splitlines()
        stats.unlink()
        rss_kb = next(int(line.split()[-1]) for line in lines if "Maximum resident set size" in line)
    else:  # the largest child so far: only right while each run is the largest yet
        rss_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"wall_s": wall, "first_step_s": seen["first"], "peak_rss_gb": rss_kb * 1024 / 1e9}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes_mb", default="25,100,400")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--tmp", default="/tmp/switchyard_bench_data", help="corpora, prepared folders and workdirs")
    p.add_argument("--file_mb", type=int, default=5, help="MB per .jsonl file")
    p.add_argument("--workers", type=int, default=None, help="moe-data prepare --workers (default: its own)")
    p.add_argument("--keep", action="store_true", help="keep the corpora and prepared folders")
    args, extra = p.parse_known_args(argv)
    sizes = [int(s) for s in args.sizes_mb.split(",")]
    tmp = pathlib.Path(args.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    docs = stdlib_documents()
    rows = []
    for size in sizes:
        corpus, prepared = tmp / f"jsonl_{size}mb", tmp / f"prepared_{size}mb"
        write_corpus(corpus, size, args.file_mb, docs)
        shutil.rmtree(prepared, ignore_errors=True)
        workers = [] if args.workers is None else [f"--workers={args.workers}"]
        prep = measured([sys.executable, "-c", DATA_MAIN, "prepare", f"--input={corpus}", f"--output={prepared}",
                         *workers], env)
        print(f"{size} MB: moe-data prepare {prep['wall_s']:.1f} s, peak RSS {prep['peak_rss_gb']:.2f} GB", flush=True)
        runs: dict[str, list[dict]] = {"jsonl": [], "prepared": []}
        for r in range(args.repeats):
            for mode, path in (("jsonl", corpus), ("prepared", prepared)):
                only = json.loads(subprocess.run([sys.executable, "-c", DATA_ONLY, str(path)], cwd=ROOT, env=env,
                                                 capture_output=True, text=True, check=True).stdout)
                work = tmp / "work"
                shutil.rmtree(work, ignore_errors=True)
                cmd = [sys.executable, "-m", "train", f"--config={ROOT / 'configs/default.py'}", f"--workdir={work}",
                       "--config.train.steps=2", "--config.data.max_bytes=0", "--config.checkpoint.every_steps=0",
                       "--config.log_every_steps=1", f"--config.data.path={path}", *extra]
                runs[mode].append({**only, **measured(cmd, env, first_line="step 1/")})
                m = runs[mode][-1]
                print(f"  {size} MB {mode:8s} run {r + 1}: data alone {m['data_s'] * 1e3:.0f} ms / {m['data_rss_gb']:.2f} GB; "
                      f"first step {m['first_step_s']:.1f} s, exit {m['wall_s']:.1f} s, peak RSS {m['peak_rss_gb']:.2f} GB",
                      flush=True)
        for mode, ms in runs.items():
            rows.append({"size_mb": size, "mode": mode, **{k: statistics.median(m[k] for m in ms) for k in ms[0]},
                         **({"prepare_s": prep["wall_s"], "prepare_rss_gb": prep["peak_rss_gb"]} if mode == "prepared" else {})})
        if not args.keep:
            shutil.rmtree(prepared, ignore_errors=True)
    shutil.rmtree(tmp / "work", ignore_errors=True)
    print_table(rows, args.repeats)
    return 0


def print_table(rows: list[dict], repeats: int) -> None:
    print(f"\nmedians of {repeats} run(s); configs/default.py, 2 steps, 8 emulated CPU devices")
    print("| text | data.path | moe-train: time to first step | wall to exit | peak RSS "
          "| the data part alone: time / peak RSS | one-off moe-data prepare: time / peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        prep = f"{r['prepare_s']:.1f} s / {r['prepare_rss_gb']:.2f} GB" if "prepare_s" in r else "-"
        print(f"| {r['size_mb']} MB | {r['mode']} | {r['first_step_s']:.1f} s | {r['wall_s']:.1f} s | "
              f"{r['peak_rss_gb']:.2f} GB | {r['data_s'] * 1e3:.0f} ms / {r['data_rss_gb']:.2f} GB | {prep} |")
    for mode in ("jsonl", "prepared"):
        same = [r for r in rows if r["mode"] == mode]
        if len(same) > 1:
            small, large = same[0], same[-1]
            print(f"{mode}, {large['size_mb']} MB / {small['size_mb']} MB: time to first step "
                  f"{large['first_step_s'] / small['first_step_s']:.2f}x, peak RSS "
                  f"{large['peak_rss_gb'] / small['peak_rss_gb']:.2f}x, data part {large['data_s'] / small['data_s']:.2f}x "
                  f"/ {large['data_rss_gb'] / small['data_rss_gb']:.2f}x (target for prepared: within 1.2x)")


if __name__ == "__main__":
    sys.exit(main())
