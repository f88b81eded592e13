"""One JSON summary of a scripts/gpu_bench.sh run: every step's outcome and every figure it produced.

    python scripts/bench_summary.py OUT_DIR [--steps install,probe,oracle,layer,train] [--final]
                                            [--interrupted SIGTERM] [--meta KEY=VALUE ...]

Reads what the run left in OUT_DIR and writes OUT_DIR/summary.json:

* ``steps.tsv``: one record per line, ``name  status  rc  start  end  limit_s  note`` (tab-separated,
  start and end in seconds since the epoch); the last record of a step wins. ``status`` is ok,
  failed, timeout, skipped or running.
* ``<step>.log``: each step's output; the last lines of a step that did not end ok go into the summary.
* the figures of the steps that ran this time (a skipped step's files are an older run's):
  ``probe.log`` (its ``probe: N PLATFORM KERNEL {json}`` line), ``oracle.log`` (the ``ok``/``FAIL``
  case lines and the closing ``P/T cases ...`` line of scripts/gpu_oracle.py), ``layer.json`` and
  ``train.json`` (moe-bench's outputs), taken whole.

Without ``--final`` the summary describes a run in progress: a step still running stays
``running`` and a step not yet started is ``pending``. With ``--final`` a step left running was
interrupted (``failed``) and one never started is ``skipped``. Standard library only, so that it
runs with any Python, whatever state the run left JAX in.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import sys

TAIL_LINES = 20
FAILING = ("failed", "timeout")


def read_steps(path: pathlib.Path) -> dict[str, dict]:
    """The last record of each step in steps.tsv, in the order the steps first appear."""
    steps: dict[str, dict] = {}
    if not path.exists():
        return steps
    for line in path.read_text(errors="replace").splitlines():
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0]:
            continue
        fields += [""] * (7 - len(fields))
        name, status, rc, start, end, limit, note = fields[:7]
        steps[name] = {"status": status, "rc": _num(rc, int), "start": _num(start, float), "end": _num(end, float),
                       "limit_s": _num(limit, float), "note": note}
    return steps


def _num(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        return None


def log_tail(path: pathlib.Path, lines: int = TAIL_LINES) -> list[str]:
    if not path.exists():
        return []
    return path.read_text(errors="replace").splitlines()[-lines:]


def parse_probe(text: str) -> dict | None:
    """The last ``probe: N PLATFORM KERNEL {json}`` line: devices, platform, kernel and any details."""
    found = None
    for line in text.splitlines():
        m = re.match(r"probe: (\d+) (\S+) (\S+)\s*(.*)$", line.strip())
        if m:
            found = m
    if found is None:
        return None
    out = {"devices": int(found[1]), "platform": found[2], "grouped_matmul": found[3]}
    if found[4]:
        try:
            extra = json.loads(found[4])
            if isinstance(extra, dict):
                out.update(extra)
        except ValueError:
            out["details"] = found[4]
    return out


def parse_oracle(text: str) -> dict | None:
    """Pass count and failed cases from scripts/gpu_oracle.py's output: a line per case, ``ok    NAME:
    RESULT`` or ``FAIL  NAME[: ERROR]``, then ``P/T cases equal the oracle ...`` (or ``oracle: P/T
    passed``). Without the closing line (the script stopped early) the case lines so far count."""
    passed_cases, failed_cases, errors, details, final = [], [], {}, {}, None
    for line in text.splitlines():
        if m := re.match(r"ok\s+(.+?)(?::\s+(.*))?$", line):
            passed_cases.append(m[1])
            if m[1].startswith("grouped matmul") and m[2]:
                details[m[1]] = m[2]
        elif m := re.match(r"FAIL\s+(.+?)(?::\s+(.*?))?\s*$", line):
            failed_cases.append(m[1])
            if m[2]:
                errors[m[1]] = m[2]
        elif m := re.match(r"(?:oracle:\s+)?(\d+)/(\d+) (?:cases|passed)\b", line.strip()):
            final = (int(m[1]), int(m[2]))
    if final is None and not passed_cases and not failed_cases:
        return None
    passed, total = final if final else (len(passed_cases), len(passed_cases) + len(failed_cases))
    out = {"passed": passed, "total": total, "complete": final is not None, "failed_cases": failed_cases}
    if errors:
        out["errors"] = errors
    if details:
        out["grouped_matmul"] = details
    return out


def read_json(path: pathlib.Path):
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return {"error": f"{path.name}: {e}"}


def summarize(out_dir: pathlib.Path, planned: list[str] | None = None, final: bool = False,
              interrupted: str | None = None, meta: dict | None = None) -> dict:
    """The summary as a dict (see the module docstring)."""
    records = read_steps(out_dir / "steps.tsv")
    ran = {name for name, rec in records.items() if rec["status"] != "skipped"}
    names = list(dict.fromkeys([*(planned or []), *records]))
    steps, failures = {}, []
    for name in names:
        rec = records.get(name)
        log = out_dir / f"{name}.log"
        if rec is None:
            step = {"status": "skipped" if final else "pending", "rc": None, "seconds": None, "limit_s": None,
                    "note": "not reached" if final else ""}
        else:
            status, note = rec["status"], rec["note"]
            if status == "running" and final:
                status, note = "failed", note or "interrupted"
            end = rec["end"]
            if end is None and rec["start"] is not None and status != "skipped":
                end = datetime.datetime.now().timestamp()  # still running, or stopped without a record
            seconds = None if rec["start"] is None or end is None else round(end - rec["start"], 1)
            step = {"status": status, "rc": rec["rc"], "seconds": seconds, "limit_s": rec["limit_s"], "note": note}
        step["log"] = str(log) if name in ran and log.exists() else None
        if step["status"] in FAILING:
            step["tail"] = log_tail(log)
            why = "timed out" + (f" after {step['limit_s']:g} s" if step["limit_s"] else "")
            if step["status"] == "failed":
                why = f"exit code {step['rc']}" if step["rc"] is not None else "failed"
            failures.append(f"{name}: {why}" + (f" ({step['note']})" if step["note"] else ""))
        steps[name] = {k: v for k, v in step.items() if v != ""}

    figures = {}
    probe_log = out_dir / "probe.log"
    if "probe" in ran and probe_log.exists() and (probe := parse_probe(probe_log.read_text(errors="replace"))):
        figures["probe"] = probe
    oracle_log = out_dir / "oracle.log"
    if "oracle" in ran and oracle_log.exists() and (oracle := parse_oracle(oracle_log.read_text(errors="replace"))):
        figures["oracle"] = oracle
        if oracle["passed"] < oracle["total"]:
            failures.append(f"oracle: {oracle['total'] - oracle['passed']} of {oracle['total']} cases differ "
                            f"({', '.join(oracle['failed_cases'])})")
    for name in ("layer", "train"):
        data = read_json(out_dir / f"{name}.json") if name in ran else None
        if data is not None:
            figures[name] = data

    running = [n for n, s in steps.items() if s["status"] in ("running", "pending")]
    ok = not failures and not interrupted and not running
    return {
        "ok": ok,
        "complete": final,
        "interrupted": interrupted,
        "written": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "out_dir": str(out_dir),
        **({"meta": meta} if meta else {}),
        "steps": steps,
        "failures": failures,
        "figures": figures,
    }


def write_summary(out_dir: pathlib.Path, summary: dict) -> pathlib.Path:
    path = out_dir / "summary.json"
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(summary, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def report(summary: dict) -> str:
    """A few lines for the terminal: one per step, then the failures."""
    lines = []
    for name, s in summary["steps"].items():
        took = "" if s.get("seconds") is None else f" {s['seconds']:g} s"
        rc = "" if s.get("rc") is None else f" rc={s['rc']}"
        note = f" ({s['note']})" if s.get("note") else ""
        lines.append(f"  {name:8s} {s['status']}{rc}{took}{note}")
    oracle = summary["figures"].get("oracle")
    if oracle:
        so_far = "" if oracle["complete"] else " (so far)"
        lines.append(f"  oracle cases: {oracle['passed']}/{oracle['total']}{so_far}")
    lines += [f"  FAILED {f}" for f in summary["failures"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out_dir", type=pathlib.Path)
    p.add_argument("--steps", default="", help="comma-separated steps the run plans, in order")
    p.add_argument("--final", action="store_true", help="the run has ended")
    p.add_argument("--interrupted", help="the signal that ended the run")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="settings to record")
    p.add_argument("--quiet", action="store_true", help="print nothing")
    args = p.parse_args(argv)
    meta = dict(kv.split("=", 1) for kv in args.meta if "=" in kv)
    planned = [s for s in args.steps.split(",") if s]
    summary = summarize(args.out_dir, planned, args.final, args.interrupted, meta)
    path = write_summary(args.out_dir, summary)
    if not args.quiet:
        print(report(summary))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
