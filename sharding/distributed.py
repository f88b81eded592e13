"""Multi-process start-up with JAX's own distributed runtime (multi-controller JAX).

Call ``initialize`` before anything touches the JAX backend. Three ways in:
  * explicit: a coordinator address, the process count and this process's id, from flags
    (``--coordinator_address --num_processes --process_id``) or the environment
    (``SWITCHYARD_COORDINATOR_ADDRESS``, ``SWITCHYARD_NUM_PROCESSES``, ``SWITCHYARD_PROCESS_ID``);
  * auto: ``--distributed=auto`` (or a detected multi-process SLURM, Open MPI, Cloud TPU or
    Kubernetes job) lets ``jax.distributed.initialize()`` read the cluster's own environment;
  * neither: one process, nothing to start.
CPU processes talk through JAX's gloo collectives. Every log line and error names the process.
"""

from __future__ import annotations

import dataclasses
import os
import sys

ENV_PREFIX = "SWITCHYARD_"


class DistributedError(RuntimeError):
    """Start-up of the multi-process runtime failed (the message names the setting)."""


@dataclasses.dataclass
class DistributedSettings:
    mode: str = "auto-detect"  # "auto-detect" (default), "auto" (force), "off"
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    local_device_ids: list[int] | None = None  # accelerators this process uses (None: see node_local_devices)
    init_timeout: int = 300  # seconds to wait for every process to join
    sync_timeout: int = 900  # seconds to wait at a barrier for the slowest process (see ``barrier``)
    shutdown_timeout: int = 60
    heartbeat_timeout: int = 100


def add_arguments(parser) -> None:
    g = parser.add_argument_group("multi-process (see the README, Multi-host)")
    g.add_argument("--distributed", default="auto-detect", choices=("auto-detect", "auto", "off"),
                   help="auto: let JAX detect the cluster; off: single process")
    g.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
    g.add_argument("--num_processes", type=int, default=None)
    g.add_argument("--process_id", type=int, default=None)
    g.add_argument("--local_device_ids", default=None,
                   help="comma-separated accelerator ids this process uses (default: all of the node's with one "
                        "process per node, else the one of its local rank)")
    g.add_argument("--init_timeout", type=int, default=300, help="seconds to wait for all processes to join")
    g.add_argument("--shutdown_timeout", type=int, default=60)
    g.add_argument("--sync_timeout", type=int, default=900,
                   help="seconds every process waits for the slowest one (still compiling, restoring) before a "
                        "program's first run")


def settings_from(args, environ=os.environ) -> DistributedSettings:
    """Flags win over ``SWITCHYARD_*`` environment variables; errors name the flag."""

    def pick(name, cast):
        value = getattr(args, name, None)
        if value is None:
            raw = environ.get(ENV_PREFIX + name.upper())
            if raw is None or raw == "":
                return None
            try:
                value = cast(raw)
            except ValueError:
                raise DistributedError(f"{ENV_PREFIX}{name.upper()}={raw!r}: expected {cast.__name__}") from None
        return value

    s = DistributedSettings(
        mode=getattr(args, "distributed", "auto-detect"),
        init_timeout=getattr(args, "init_timeout", 300),
        shutdown_timeout=getattr(args, "shutdown_timeout", 60),
        sync_timeout=getattr(args, "sync_timeout", 900),
    )
    s.coordinator_address = pick("coordinator_address", str) or ""
    s.num_processes = pick("num_processes", int) or 0
    pid = pick("process_id", int)
    s.process_id = -1 if pid is None else pid
    if s.coordinator_address:
        if s.num_processes < 1:
            raise DistributedError(f"--num_processes={s.num_processes}: required (>= 1) with --coordinator_address")
        if not 0 <= s.process_id < s.num_processes:
            raise DistributedError(f"--process_id={s.process_id}: must be in [0, {s.num_processes})")
        if ":" not in s.coordinator_address:
            raise DistributedError(f"--coordinator_address={s.coordinator_address}: expected HOST:PORT")
    ids = pick("local_device_ids", str)
    if ids is not None:
        try:
            s.local_device_ids = [int(i) for i in ids.split(",")]
        except ValueError:
            raise DistributedError(f"--local_device_ids={ids}: expected comma-separated integers") from None
    if s.init_timeout < 1:
        raise DistributedError(f"--init_timeout={s.init_timeout}: must be >= 1 second")
    if s.sync_timeout < 1:
        raise DistributedError(f"--sync_timeout={s.sync_timeout}: must be >= 1 second")
    return s


def detected_cluster(environ=os.environ) -> str | None:
    """The multi-process cluster this process seems to run in, if any."""
    if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in environ:
        return "slurm"
    if int(environ.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "openmpi"
    if environ.get("TPU_WORKER_HOSTNAMES", "").count(",") >= 1:
        return "cloud-tpu"
    if "JOBSET_NAME" in environ or "JOB_COMPLETION_INDEX" in environ and "KUBERNETES_SERVICE_HOST" in environ:
        return "kubernetes"
    return None


def _tasks_on_this_node(cluster: str, environ) -> int | None:
    if cluster == "openmpi":
        return int(environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", "0") or 0) or None
    if cluster == "slurm":  # "8", "1(x2)" or "2,1": the first node's count when all nodes agree
        raw = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE") or ""
        counts = {part.split("(")[0] for part in raw.split(",") if part}
        return int(counts.pop()) if len(counts) == 1 and next(iter(counts)).isdigit() else None
    return None


def node_local_devices(environ=os.environ) -> list[int] | None:
    """With one process per node under SLURM or Open MPI, every GPU of the node.

    ``jax.distributed.initialize()`` otherwise gives each process only the GPU of its local rank
    (one per process), which would leave all but one GPU of every node idle. None: let JAX decide.
    """
    cluster = detected_cluster(environ)
    if cluster is None or _tasks_on_this_node(cluster, environ) != 1:
        return None
    visible = environ.get("CUDA_VISIBLE_DEVICES", "")
    n = len(visible.split(",")) if visible else int(environ.get("SLURM_GPUS_ON_NODE", "0") or 0)
    return list(range(n)) if n else None


_state = {"started": False, "index": 0, "count": 1, "sync_timeout": 900, "barriers": 0}


def _wait_for_coordinator(address: str, timeout_s: float, process_id: int) -> None:
    """A non-zero process first waits for the coordinator's port, failing with one clear line."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedError(
                    f"[process {process_id}] no coordinator at --coordinator_address={address} after "
                    f"--init_timeout={int(timeout_s)}s ({e.strerror or e}); is process 0 running?"
                ) from None
            time.sleep(0.5)


def initialize(settings: DistributedSettings) -> tuple[int, int]:
    """Start the runtime if this is a multi-process job; returns (process index, process count)."""
    import jax

    kwargs = dict(
        initialization_timeout=settings.init_timeout,
        heartbeat_timeout_seconds=settings.heartbeat_timeout,
        shutdown_timeout_seconds=settings.shutdown_timeout,
    )
    try:
        if settings.mode == "off":
            pass
        elif settings.coordinator_address:
            if settings.num_processes > 1:
                if settings.process_id > 0:
                    _wait_for_coordinator(settings.coordinator_address, settings.init_timeout, settings.process_id)
                # JAX aborts the process (it does not raise) when the others do not join in time:
                # say first what it is waiting for, so that the abort has a context.
                print(
                    f"[process {settings.process_id}] joining {settings.num_processes} processes at "
                    f"{settings.coordinator_address} (waiting up to {settings.init_timeout} s)",
                    file=sys.stderr,
                    flush=True,
                )
                jax.distributed.initialize(
                    settings.coordinator_address, settings.num_processes, settings.process_id,
                    local_device_ids=settings.local_device_ids, **kwargs
                )
                _state["started"] = True
        elif settings.mode == "auto" or detected_cluster():
            ids = settings.local_device_ids if settings.local_device_ids is not None else node_local_devices()
            jax.distributed.initialize(local_device_ids=ids, **kwargs)
            _state["started"] = True
    except DistributedError:
        raise
    except Exception as e:  # noqa: BLE001 - any start-up failure becomes one line
        where = settings.coordinator_address or "auto-detected cluster"
        raise DistributedError(
            f"[process {max(settings.process_id, 0)}] jax.distributed start-up with {where} failed "
            f"(--init_timeout={settings.init_timeout}s): {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    _state["index"], _state["count"] = jax.process_index(), jax.process_count()
    _state["sync_timeout"] = settings.sync_timeout
    return _state["index"], _state["count"]


def barrier(name: str) -> None:
    """Every process waits here until all have arrived (up to ``--sync_timeout``); a no-op alone.

    Through the coordination service (no device collective, so no fixed deadline): XLA:CPU's gloo
    collectives give the processes a fixed 30 s, not settable, to meet when a program first runs a
    collective over a set of devices, which a loaded machine can exceed while one process still
    compiles. Barrier names need only be the same on every process: a counter makes each unique."""
    import jax

    if jax.process_count() <= 1:
        return
    from orbax.checkpoint import multihost

    _state["barriers"] += 1
    wait = multihost.get_barrier_sync_fn()
    try:
        wait(key=f"switchyard_{_state['barriers']}_{name}", timeout_ms=1000 * _state["sync_timeout"])
    except Exception as e:  # noqa: BLE001 - a peer that never arrives becomes one line
        raise DistributedError(
            f"{prefix()}not every process reached '{name}' within --sync_timeout={_state['sync_timeout']}s "
            f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); is a peer stalled or dead?"
        ) from e


def aligned(jitted, name: str):
    """``jitted`` whose first call compiles, waits at a ``barrier`` for every process, then runs.

    Each process compiles a program on its own, at its own speed; without the barrier the fastest
    would wait at the program's first collective under gloo's fixed 30 s deadline. Later calls go
    straight to ``jitted`` (the compiled program is in its cache). Alone: ``jitted`` itself."""
    import jax

    if jax.process_count() <= 1:
        return jitted
    pending = [True]

    def call(*args):
        if pending[0]:
            jitted.lower(*args).compile()
            barrier(f"first run of {name}")
            pending[0] = False
        return jitted(*args)

    return call


def prefix() -> str:
    """``"[process i/n] "`` in a multi-process job, else empty."""
    return f"[process {_state['index']}/{_state['count']}] " if _state["count"] > 1 else ""


def shutdown() -> None:
    if _state["started"]:
        import jax

        jax.distributed.shutdown()
        _state["started"] = False
