"""A ``jax.profiler`` trace of a few training steps after warm-up (``config.profile_steps``).

The trace starts just before the second step this process runs (the first one compiles), after
the earlier steps have finished on the device, covers ``profile_steps`` steps, waits for them to
finish and stops. A run that ends sooner (steps exhausted, SIGTERM, an error) stops it on the way
out. Only process 0 traces. Nothing extra needs installing to write a trace; on CPU it records
the host threads and XLA's CPU ops.

``jax.profiler.stop_trace`` writes ``DIR/plugins/profile/<timestamp>/``: ``<host>.xplane.pb``
(XProf, or TensorBoard's profile plugin), ``<host>.trace.json.gz`` and ``perfetto_trace.json.gz``
(open at https://ui.perfetto.dev).
"""

from __future__ import annotations

import contextlib
import pathlib
from typing import Callable

import jax


class StepProfiler:
    """``maybe_start`` before dispatching a step, ``annotate`` around it, ``step_done`` after it;
    ``finish`` once the loop is over (normally or not)."""

    def __init__(self, directory: pathlib.Path, num_steps: int, *, enabled: bool, log: Callable[[str], None]):
        self.directory = pathlib.Path(directory)
        self.num_steps = num_steps if enabled else 0
        self.log = log
        self.active = False
        self.first = self.last = None  # 1-based numbers of the first and last traced steps
        self.session: pathlib.Path | None = None  # the folder the trace went to

    def maybe_start(self, step: int, warm: bool, previous) -> None:
        """Start the trace before step ``step`` (1-based) if it is due: ``warm`` once a step has
        run in this process.

        ``previous`` (the state the next step consumes) is waited for first, so that the
        trace holds whole steps and no compilation.
        """
        if not warm or self.active or self.first is not None or self.num_steps == 0:
            return
        jax.block_until_ready(previous)
        try:
            jax.profiler.start_trace(self.directory, create_perfetto_trace=True)
        except RuntimeError as e:  # e.g. a trace the caller started is already running
            self.log(f"profile: not started ({e})")
            self.num_steps = 0
            return
        self.active, self.first = True, step

    def annotate(self, step: int):
        """Marks one step in the trace (XProf's step-time views read these); ``step`` is 1-based."""
        if not self.active:
            return contextlib.nullcontext()
        self.last = step
        return jax.profiler.StepTraceAnnotation("train", step_num=step)

    def step_done(self, outputs) -> None:
        """After dispatching a step: stop once ``num_steps`` have been dispatched and finished."""
        if self.active and self.last is not None and self.last - self.first + 1 >= self.num_steps:
            self.stop(outputs)

    def stop(self, outputs=None) -> None:
        """Wait for ``outputs`` (when given) so the traced steps are complete, then stop and say where."""
        if not self.active:
            return
        self.active = False
        try:
            if outputs is not None:
                jax.block_until_ready(outputs)
        finally:
            jax.profiler.stop_trace()
        sessions = sorted((self.directory / "plugins" / "profile").glob("*/"), key=lambda p: p.stat().st_mtime)
        self.session = sessions[-1] if sessions else self.directory
        self.log(
            f"profile: steps {self.first}-{self.last or self.first} traced to {self.session}; view with "
            f"xprof --logdir={self.directory} or tensorboard --logdir={self.directory} (pip install xprof), "
            "or open its perfetto_trace.json.gz at https://ui.perfetto.dev"
        )

    def finish(self) -> None:
        """On the way out of the loop: stop a trace still running (without waiting: this may be an
        error path), or say that no step was left to trace."""
        if self.active:
            try:
                self.stop()
            except Exception as e:  # noqa: BLE001 - never hide the error that ended the loop
                self.log(f"profile: could not be written ({type(e).__name__}: {e})")
        elif self.num_steps and self.first is None:
            self.log("profile: nothing traced (this run had no step after the first, compiling one)")
