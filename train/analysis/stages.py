"""Where an MoE layer's time goes: the device time of a profiled program, by named stage.

Every operation of the MoE layer carries its stage in its name (``jax.named_scope``: ``route``,
``permute``, ``exchange``, ``experts``, ``exchange_back``, ``unpermute``; the backward pass's
operations are under ``transpose(...)``). ``stage_times`` runs a compiled program under
``jax.profiler``, reads the Perfetto trace it writes, maps each device operation (its ``hlo_op``)
to its stage through the compiled HLO's metadata, and sums the durations per stage and direction,
per call and device. Operations outside every stage (the loss, an optimizer) count as ``other``.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
import tempfile

import jax

STAGES = ("route", "permute", "exchange", "experts", "exchange_back", "unpermute")
_OP = re.compile(r'%?([\w.\-]+) = [^\n]*?op_name="([^"]*)"')


def stage_of(op_name: str) -> str:
    """'route', ..., 'unpermute' (the innermost stage in the op's name path), with ' bwd' for the
    backward pass; 'other' outside every stage."""
    parts = [p.rsplit("(", 1)[-1].rstrip(")") for p in re.split(r"[/;]", op_name)]  # jvp(route) -> route
    stage = next((p for p in reversed(parts) if p in STAGES), "other")
    return f"{stage} bwd" if stage != "other" and "transpose(" in op_name else stage


def op_stages(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> stage, from a compiled program's text (``compiled.as_text()``)."""
    return {name: stage_of(op_name) for name, op_name in _OP.findall(hlo_text)}


def summarize(events: list[dict], stages: dict[str, str], calls: int) -> dict[str, float]:
    """Milliseconds per call and device by stage, from Perfetto trace events of device operations."""
    total, devices = collections.Counter(), set()
    for e in events:
        args = e.get("args") or {}
        op = args.get("hlo_op")
        if e.get("ph") != "X" or op not in stages:
            continue
        devices.add(args.get("device_ordinal", e.get("pid")))
        total[stages[op]] += float(e.get("dur", 0.0)) / 1e3
    n = max(len(devices), 1) * calls
    return {stage: ms / n for stage, ms in sorted(total.items())}


def stage_times(compiled, args, calls: int = 3) -> dict[str, float]:
    """Run ``compiled(*args)`` ``calls`` times under the profiler: ms per call and device by stage."""
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(compiled(*args))
        trace = next(pathlib.Path(tmp).rglob("*perfetto_trace.json.gz"))
        data = json.loads(gzip.decompress(trace.read_bytes()))
    events = data["traceEvents"] if isinstance(data, dict) else data
    return summarize(events, op_stages(compiled.as_text()), calls)


def stage_line(stages: dict[str, float]) -> str:
    order = [s for base in STAGES for s in (base, f"{base} bwd")] + ["other"]
    return "  ".join(f"{s} {stages[s]:.2f}" for s in order if s in stages)
