"""What every command line shares: flags, config loading, start-up of JAX, and how errors end.

JAX is imported only after the device count is set, since XLA reads it when its backend starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys

INT32_MAX = 2**31 - 1  # step numbers and token positions are int32
WEEK_S = 7 * 24 * 3600


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a numeric flag accepts: ``low`` (or above it, ``low_open``) to ``high``."""

    low: float
    high: float
    low_open: bool = False
    unit: str = ""

    def holds(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        return math.isfinite(value) and above and value <= self.high

    def text(self, value) -> str:
        kind = "a finite number " if isinstance(value, float) else ""
        low = ">" if self.low_open else ">="
        return f"must be {kind}{low} {_number(self.low)} and <= {_number(self.high)}{self.unit}"


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


# the flags of every command (common_args) and of multi-process jobs (sharding.distributed.add_arguments)
SHARED_RANGES = {
    "cpu_devices": Range(1, 4096),
    "num_processes": Range(1, 65536),
    "process_id": Range(0, 65535),
    "init_timeout": Range(1, WEEK_S, unit=" seconds"),
    "shutdown_timeout": Range(0, WEEK_S, unit=" seconds"),
    "sync_timeout": Range(1, WEEK_S, unit=" seconds"),
}


def check_ranges(prog: str, args, ranges: dict[str, Range]) -> None:
    """One line naming the flag and its range, exit code 2, for a numeric flag outside its range;
    a flag left unset (None) or absent is not checked. ``start_jax`` checks ``SHARED_RANGES``."""
    for name, allowed in ranges.items():
        value = getattr(args, name, None)
        if value is not None and not allowed.holds(value):
            fail(prog, f"--{name}={value}: {allowed.text(value)}")


def ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def split_overrides(rest: list[str], prog: str) -> list[tuple[str, str]]:
    """``--config.a.b=v`` or ``--config.a.b v`` pairs; anything else is an error."""
    out, i = [], 0
    while i < len(rest):
        arg = rest[i]
        if not arg.startswith("--config."):
            fail(prog, f"{arg}: unrecognised argument")
        key, eq, value = arg[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(rest):
                fail(prog, f"{arg}: missing value")
            value, i = rest[i + 1], i + 1
        out.append((key, value))
        i += 1
    return out


def fail(prog: str, message: str, code: int = 2):
    from sharding.distributed import prefix

    print(f"{prefix()}{prog}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def stderr_log(prog: str):
    """A ``log(message)`` that prints one line on stderr, named by the command (and process)."""
    from sharding.distributed import prefix

    return lambda message: print(f"{prefix()}{prog}: {message}", file=sys.stderr, flush=True)


def check_workdir(prog: str, workdir: str) -> None:
    """Run folders are paths; an object-store URL would silently become a local folder."""
    if "://" in workdir:
        fail(prog, f"--workdir={workdir}: URLs are not supported; mount the bucket on every host "
                   "(e.g. Cloud Storage FUSE at /mnt/gcs) and pass that path")


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu_devices", type=int, default=8, help="CPU devices to emulate when no accelerator is used")
    p.add_argument("--verbose", action="store_true", help="show tracebacks")


def load_config(prog: str, path: str, overrides: list[tuple[str, str]]):
    """The config file with ``--config.KEY=VALUE`` overrides applied, validated; one line on error."""
    from train.core.config import apply_override, load_config_file, validate
    from train.errors import ConfigError

    try:
        cfg = load_config_file(path)
        for key, value in overrides:
            apply_override(cfg, key, value)
        validate(cfg)
    except ConfigError as e:
        fail(prog, str(e))
    return cfg


def run_guarded(prog: str, verbose: bool, fn) -> int:
    """Run ``fn``; user-caused errors become one line and exit code 2, a run that cannot go on
    (no readable checkpoint, too many non-finite steps, a failed save) one line and exit code 1;
    --verbose shows the traceback."""
    from sharding.distributed import prefix, shutdown
    from train.errors import RUN_ERRORS, USER_ERRORS

    try:
        return fn()
    except USER_ERRORS + RUN_ERRORS as e:
        if verbose:
            raise
        fail(prog, str(e), 2 if isinstance(e, USER_ERRORS) else 1)
    except KeyboardInterrupt:  # end now: an orderly exit could wait on threads a cut-short save left behind
        sys.stdout.flush()
        print(f"{prefix()}{prog}: interrupted", file=sys.stderr, flush=True)
        os._exit(130)
    except Exception as e:
        if not prefix():  # one process: the traceback is the report
            raise
        # Several processes: a failed collective usually means a peer died. A graceful
        # jax.distributed shutdown would wait for that peer at a barrier, so report and leave now.
        import traceback

        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0][:300]
        print(f"{prefix()}{prog}: {type(e).__name__}: {first}; stopping without waiting for the other processes",
              file=sys.stderr, flush=True)
        os._exit(1)
    finally:
        shutdown()


def start_jax(prog: str, args, distributed: bool = False) -> None:
    """Set the CPU device count, then (multi-process jobs) start jax.distributed: in that order."""
    import logging

    # Orbax logs informational warnings, and every failure of a background save as tracebacks from
    # several threads; the run reports such a failure itself, in one line (--verbose shows them)
    check_ranges(prog, args, SHARED_RANGES)
    logging.getLogger("absl").setLevel(logging.ERROR if args.verbose else logging.CRITICAL)
    if not args.verbose:
        _quiet_aborted_reads()
    from sharding.mesh import emulate_cpu_devices

    emulate_cpu_devices(args.cpu_devices)
    if distributed:
        from sharding import distributed as dist

        try:
            dist.initialize(dist.settings_from(args))
        except dist.DistributedError as e:
            print(f"{prog}: {e}", file=sys.stderr, flush=True)
            raise SystemExit(3) from None


def _quiet_aborted_reads() -> None:
    """An unreadable checkpoint aborts Orbax's other reads of it; their coroutines report the same
    failure as one traceback each when collected. The command names the checkpoint in one line."""
    default = sys.unraisablehook

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        default(unraisable)

    sys.unraisablehook = hook


def write_json(path: str | None, payload: dict) -> None:
    if path:
        import json
        import pathlib

        from train.services.workdir import write_text_atomic

        pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(pathlib.Path(path), json.dumps(payload, indent=1))
        print(f"wrote {path}")
