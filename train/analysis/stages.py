"""Where an MoE layer's time goes: the device time of a profiled program, by named stage.

Every operation of the MoE layer carries its stage in its name (``jax.named_scope``: ``route``,
``permute``, ``exchange``, ``experts``, ``exchange_back``, ``unpermute``; the backward pass's
operations are under ``transpose(...)``). ``stage_times`` runs a compiled program under
``jax.profiler``, reads the Perfetto trace it writes (``perfetto_trace.json.gz``, Chrome trace
events: "X" events with ``dur`` in microseconds, "M" events naming processes and threads), maps each
device operation to its HLO instruction and that to its stage through the compiled HLO's metadata,
and sums the durations per stage and direction, per call and device. Operations outside every stage
(the loss, an optimizer) count as ``other``.

Two trace layouts are read:

* CPU: one process ``/host:CPU``; XLA's thunk executor writes one event per HLO instruction, with
  ``args.hlo_op`` and ``args.device_ordinal``. Every event with a known ``hlo_op`` counts.
* GPU: processes ``/device:GPU:<n>`` whose threads ``Stream #<id>(Kernel,MemcpyD2D,...)`` hold the
  CUDA kernels and copies as the device ran them (named after the kernel: ``loop_add_fusion_3``,
  ``nvjet_...``, ``ncclDevKernel_...``), with ``args.hlo_op`` / ``hlo_module`` from XLA's annotation;
  ``/host:CPU`` also holds the launches (``cuLaunchKernel`` with the same ``hlo_op``). Only the
  stream threads of the device processes count; an event without ``hlo_op`` is matched by its kernel
  name (XLA names a kernel after its instruction, ``.`` and ``-`` turned into ``_``).

Kernels that XLA:GPU launches from a command buffer (a CUDA graph) carry no HLO instruction of their
own, so on GPU the profiled program is compiled with ``profile_compiler_options``. A profile in which
no device operation matched raises ``StageProfileError``.
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
PROFILE_COMPILER_OPTIONS = {"gpu": {"xla_gpu_enable_command_buffer": ""}}  # backend -> XLA options
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"\bcalls=%?([\w.\-]+)")


class StageProfileError(RuntimeError):
    """No device operation of a profile matched an instruction of the profiled program."""


def stage_of(op_name: str) -> str:
    """'route', ..., 'unpermute' (the innermost stage in the op's name path), with ' bwd' for the
    backward pass; 'other' outside every stage."""
    parts = [p.rsplit("(", 1)[-1].rstrip(")") for p in re.split(r"[/;]", op_name)]  # jvp(route) -> route
    stage = next((p for p in reversed(parts) if p in STAGES), "other")
    return f"{stage} bwd" if stage != "other" and "transpose(" in op_name else stage


def op_stages(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> stage, from a compiled program's text (``compiled.as_text()``).

    An instruction without ``op_name`` metadata that calls a computation (``calls=``: a fusion, an
    async wrapper) takes the most common stage other than 'other' of the instructions in it."""
    stages, members, callee = {}, collections.defaultdict(list), {}
    computation = None
    for line in hlo_text.splitlines():
        if line[:1].strip() and line.rstrip().endswith("{"):  # "[ENTRY ]%name (params) -> shape {"
            computation = line.removeprefix("ENTRY ").lstrip("%").split(" ", 1)[0]
            continue
        if not (instruction := _INSTRUCTION.match(line)):
            continue
        name = instruction.group(1)
        members[computation].append(name)
        if op_name := _OP_NAME.search(line):
            stages[name] = stage_of(op_name.group(1))
        elif call := _CALLS.search(line):
            callee[name] = call.group(1)
    for name, computation in callee.items():  # callees print before their callers
        inner = collections.Counter(stages.get(n, "other") for n in members.get(computation, ()))
        inner.pop("other", None)
        if inner:
            stages[name] = inner.most_common(1)[0][0]
    return stages


def profile_compiler_options(backend: str) -> dict[str, str]:
    """XLA compile options for a program whose profile ``stage_times`` reads, on ``backend``
    (``jax.default_backend()``): on GPU, no command buffers."""
    return dict(PROFILE_COMPILER_OPTIONS.get(backend, {}))


def _names(events: list[dict]) -> tuple[dict, dict]:
    """pid -> process name and (pid, tid) -> thread name, from the trace's metadata events."""
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") in ("process_name", "thread_name"):
            name = (e.get("args") or {}).get("name", "")
            if e["name"] == "process_name":
                processes[e.get("pid")] = name
            else:
                threads[(e.get("pid"), e.get("tid"))] = name
    return processes, threads


def device_events(events: list[dict]) -> tuple[list[dict], bool]:
    """The complete events that are device operations, and whether the trace has device processes
    (GPU). With device processes: only their events, and of a process with ``Stream #`` threads only
    those threads' (not derived lines such as "XLA Ops"); without (CPU): every complete event."""
    processes, threads = _names(events)
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    complete = [e for e in events if e.get("ph") == "X"]
    if not devices:
        return complete, False
    streams = {key for key, name in threads.items() if key[0] in devices and name.startswith("Stream #")}
    with_streams = {pid for pid, _ in streams}
    return [e for e in complete if e.get("pid") in devices
            and ((e.get("pid"), e.get("tid")) in streams or e.get("pid") not in with_streams)], True


def describe(events: list[dict]) -> str:
    """One line: how many events, and each process's name with its first threads' names."""
    processes, threads = _names(events)
    parts = []
    for pid, process in sorted(processes.items(), key=lambda p: str(p[1])):
        names = [name for (p, _), name in sorted(threads.items(), key=lambda t: str(t[1])) if p == pid]
        more = f", +{len(names) - 4} more" if len(names) > 4 else ""
        parts.append(f"{process} [{', '.join(names[:4])}{more}]")
    complete = sum(e.get("ph") == "X" for e in events)
    return f"{complete} complete events of {len(events)}; processes: {'; '.join(parts) or 'none named'}"


def summarize(events: list[dict], stages: dict[str, str], calls: int, source: str = "the trace") -> dict[str, float]:
    """Milliseconds per call and device by stage, from the trace events of a profile (see the module
    docstring for the layouts read). Raises ``StageProfileError`` when no device time matched."""
    picked, on_gpu = device_events(events)
    by_kernel = {}
    for op in stages if on_gpu else ():
        by_kernel.setdefault(re.sub(r"[^A-Za-z0-9_$]", "_", op), op)
    total, devices = collections.Counter(), set()
    for e in picked:
        args = e.get("args") or {}
        op = args.get("hlo_op", by_kernel.get(e.get("name")))
        if op not in stages:
            continue
        devices.add(e.get("pid") if on_gpu else args.get("device_ordinal", e.get("pid")))
        total[stages[op]] += float(e.get("dur", 0.0)) / 1e3
    if sum(total.values()) <= 0:
        raise StageProfileError(
            f"no device time in {source} matched an HLO instruction of the profiled program ({describe(events)}); "
            f"on GPU, compile it with {PROFILE_COMPILER_OPTIONS['gpu']} (command buffers hide the ops)")
    n = len(devices) * calls
    return {stage: ms / n for stage, ms in sorted(total.items())}


def read_trace(path: pathlib.Path) -> list[dict]:
    """The trace events of a ``*.json.gz`` Chrome/Perfetto trace."""
    data = json.loads(gzip.decompress(pathlib.Path(path).read_bytes()))
    return data["traceEvents"] if isinstance(data, dict) else data


def stage_times(compiled, args, calls: int = 3) -> dict[str, float]:
    """Run ``compiled(*args)`` ``calls`` times under the profiler: ms per call and device by stage.

    On GPU compile the program with ``profile_compiler_options("gpu")``; raises
    ``StageProfileError`` when no device operation of the profile matched the program."""
    jax.block_until_ready(compiled(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(calls):
                jax.block_until_ready(compiled(*args))
        trace = next(pathlib.Path(tmp).rglob("*perfetto_trace.json.gz"))
        events = read_trace(trace)
    return summarize(events, op_stages(compiled.as_text()), calls, source=trace.name)


def stage_line(stages: dict[str, float]) -> str:
    order = [s for base in STAGES for s in (base, f"{base} bwd")] + ["other"]
    return "  ".join(f"{s} {stages[s]:.2f}" for s in order if s in stages)
