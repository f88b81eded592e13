"""The training loop: dispatch a step, read the previous one back, act on the schedule.

``train(run, state)`` (the run built by ``train.core.setup.setup``) runs steps until
``train.steps`` and returns the last state and the summary. The loop never waits on the step it
just dispatched: after dispatching step N it reads step N-1's
metrics (``StepLog``), so host work overlaps device work. Around that, small parts: a
throughput clock (``Throughput``), periodic actions (checkpoint, evaluation, a profile of a few
steps), the stop signals (SIGTERM, Ctrl-C: ``train.services.signals``) as the step's own input, and a
watchdog for stalled peers.
"""

from __future__ import annotations

import dataclasses
import json
import time

import jax
import numpy as np

from moe.costs import flops_per_token
from train.core.setup import Run
from train.core.step import TrainState
from train.errors import NonFiniteError
from train.services import metrics as metrics_lib
from train.services.profiler import StepProfiler
from train.services.signals import StopSignals
from train.services.watchdog import Watchdog
from train.services.workdir import write_text_atomic


class Throughput:
    """tokens/s and MFU over the steps between two logged rows. The first step (it compiles) and
    evaluations are not training time."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, num_devices: int, peak_flops: float):
        self.tokens_per_step, self.flops, self.devices, self.peak = tokens_per_step, flops_per_token, num_devices, peak_flops
        self.start: float | None = None
        self.tokens = 0
        self.rates: list[float] = []

    def step_done(self, now: float) -> None:
        if self.start is None:  # the first step includes compilation: start timing after it
            self.start, self.tokens = now, 0
        else:
            self.tokens += self.tokens_per_step

    def sample(self, now: float) -> tuple[float | None, float | None]:
        """(tokens/s, MFU) since the last sample, or (None, None) before a timed window exists."""
        if not self.tokens:
            return None, None
        rate = self.tokens / (now - self.start)
        self.rates.append(rate)
        self.start, self.tokens = now, 0
        return rate, metrics_lib.mfu(rate, self.flops, self.devices, self.peak)

    def restart(self) -> None:
        self.start, self.tokens = time.perf_counter(), 0

    def median(self) -> float | None:
        return float(np.median(self.rates)) if self.rates else None


@dataclasses.dataclass
class Progress:
    """What a call of ``train`` has done, kept by its caller (readable after an exception too)."""

    steps_done: int = 0  # training steps finished (read back)


class StepLog:
    """Reads a dispatched step's metrics back, writes its row, and keeps the run's summary, the
    stop flag every process sees, the guard against non-finite steps, and the checkpoints' blocking
    times."""

    def __init__(self, run: Run, clock: Throughput, watchdog: Watchdog, end: int, progress: Progress):
        self.run, self.clock, self.watchdog, self.end, self.progress = run, clock, watchdog, end, progress
        self.summary: dict = {"first_loss": None, "last_loss": None, "tokens_per_sec": None, "skipped_steps": 0}
        self.stop_requested = False  # some process was signalled (read back from a step)
        self.nonfinite_run = 0
        self.save_blocking_ms: list[float] = []

    def read(self, pending) -> None:
        """Wait for step ``pending = (step, device metrics, the router probe's routes or None)`` (if
        any) and account for it."""
        if pending is None:
            return
        step, dev_metrics, routes = pending
        host, routes = jax.device_get((dev_metrics, routes))  # waits for that step only
        self.watchdog.beat(step)
        self.progress.steps_done += 1
        now = time.perf_counter()
        loss = float(host["loss"])
        if self.summary["first_loss"] is None:
            self.summary["first_loss"] = loss
        self.summary["last_loss"] = loss
        self.stop_requested |= bool(host.pop("stop"))
        skipped = bool(host["skipped"])
        self.summary["skipped_steps"] += int(skipped)
        self.nonfinite_run = self.nonfinite_run + 1 if host["nonfinite"] else 0
        self.clock.step_done(now)
        if routes is not None:
            host.update(self.run.probe.telemetry.metrics(routes))
        if self.logs(step) or skipped:
            self._write(step + 1, host, None if skipped else now)
        if skipped:
            what = "non-finite loss or gradient" if host["nonfinite"] else "loss spike"
            self.run.log(f"step {step + 1}: update skipped ({what}); parameters, optimizer and model state unchanged")
        limit = self.run.cfg.train.max_nonfinite_steps
        if self.nonfinite_run >= limit:
            raise NonFiniteError(
                f"train: step {step + 1} ends {self.nonfinite_run} non-finite steps in a row "
                f"(train.max_nonfinite_steps={limit}); stopped without saving a checkpoint. "
                f"The last good checkpoint is in {self.run.checkpoints.directory}"
            )

    def logs(self, step: int) -> bool:
        """Whether step ``step`` (0-based) writes a row on schedule."""
        return (step + 1) % self.run.cfg.log_every_steps == 0 or step + 1 == self.end

    def save(self, state: TrainState, step: int, *, force: bool = False) -> None:
        """Start an asynchronous checkpoint of ``state`` as step ``step``."""
        self.save_blocking_ms.append(self.run.save_checkpoint(state, step, force=force))

    def _write(self, step: int, host: dict, now: float | None) -> None:
        row = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in host.items()}
        # null until a timed window exists (the first step compiles); a skipped step is not timed
        row["tokens_per_sec"], row["mfu"] = self.clock.sample(now) if now is not None else (None, None)
        self.run.writer.write(step, row)


def train(run: Run, state: TrainState, *, stop_at: int | None = None, signals: StopSignals | None = None,
          progress: Progress | None = None) -> tuple[TrainState, dict]:
    """Train ``state`` to ``train.steps`` (or stop after step ``stop_at``, checkpointed, as an
    interruption would); returns the last state and the summary. The state passed in is donated.

    SIGTERM (preemption) or Ctrl-C (``signals``, installed here unless given) stops at the next
    step boundary: a checkpoint of the current step is saved (unless no step was taken since the
    last one), waited for, and the summary says ``preempted`` (the step) and ``stopped_by``. A
    signal to any process stops all of them after the same step (the flag is the step's ``stop``
    input, reduced in the step). ``train.max_nonfinite_steps`` consecutive skipped (non-finite)
    updates raise ``NonFiniteError`` without a new checkpoint. ``progress`` (the caller's) counts
    the steps finished."""
    cfg, t = run.cfg, run.cfg.train
    start_step = int(state.step)
    end = t.steps if stop_at is None else min(stop_at, t.steps)
    if start_step and start_step >= end:
        return state, _nothing_to_do(run, start_step, end, stop_at)
    own_signals = signals is None
    signals = StopSignals(run.log) if own_signals else signals
    # armed at the first finished step: compiling is not stalling
    watchdog = Watchdog(t.step_timeout_s or (900.0 if run.nproc > 1 else 0.0))
    profiler = StepProfiler(run.workdir / "profile", cfg.profile_steps, enabled=run.proc == 0, log=run.log)
    peak = cfg.peak_flops_per_device or metrics_lib.peak_flops_per_device(run.devices[0].device_kind, cfg.model.dtype)
    clock = Throughput(t.batch_size * t.seq_len, flops_per_token(cfg.model, t.seq_len), len(run.devices), peak)
    log = StepLog(run, clock, watchdog, end, Progress() if progress is None else progress)
    try:
        with run.context():
            state, stopped = _train_steps(run, state, start_step, end, signals, log, profiler)
            if stopped is not None:
                return state, stopped
            if run.checkpoints.latest_step() != end:
                log.save(state, end, force=True)
        watchdog.beat(end - 1)
        final_eval = run.evaluate(state)
    finally:
        profiler.finish()  # a trace still running here (preemption, error) stops without waiting
        watchdog.stop()
        if own_signals:
            signals.restore()
    return state, _finish(run, end, final_eval, log, profiler)


def _nothing_to_do(run: Run, reached: int, end: int, stop_at: int | None) -> dict:
    """A resumed run asked to end at or before the step it restored: no step, checkpoint, metrics
    row or summary is written (one below ``reached`` would hold a later state under an earlier name)."""
    asked = f"train.steps={run.cfg.train.steps}" if end == run.cfg.train.steps else f"stop_at={stop_at}"
    run.log(f"{asked}: the run in {run.workdir} is already at step {reached}; nothing to do")
    return {"nothing_to_do": True, "reached": reached, "end": end}


def _train_steps(run: Run, state: TrainState, start_step: int, end: int, signals: StopSignals, log: StepLog,
                 profiler) -> tuple[TrainState, dict | None]:
    """The steps: (the last state, a summary if a stop signal ended them early, else None)."""
    cfg = run.cfg
    pending = None  # (step, device metrics, probe routes) of the step dispatched last
    for step in range(start_step, end):
        if run.nproc == 1 and signals.requested:  # alone: stop at this boundary, no step more
            log.read(pending)
            return state, _stop(run, state, step, start_step, signals.reason, log)
        batch = run.global_batch(next(run.batches))
        profiler.maybe_start(step + 1, warm=step > start_step, previous=state)  # after the compiling step
        with profiler.annotate(step + 1):
            state, dev_metrics = run.train_step(state, batch, signals.requested)
        routes = None
        if log.logs(step) and run.probe is not None:  # router telemetry of the state this step made
            routes = run.routing_probe(state)
        profiler.step_done((state, dev_metrics, routes))
        log.read(pending)
        pending = (step, dev_metrics, routes)
        if log.stop_requested:  # read back from the previous step: every process stops after this one
            log.read(pending)
            return state, _stop(run, state, step + 1, start_step, signals.reason or "a signal to another process", log)
        if _due(cfg.checkpoint.every_steps, step + 1) and step + 1 < end:
            log.save(state, step + 1)  # asynchronous: blocks only for the device-to-host copy
        if _due(cfg.eval_every_steps, step + 1) and step + 1 < cfg.train.steps:
            log.read(pending)
            pending = None
            run.writer.write(step + 1, run.evaluate(state), split="eval")
            log.watchdog.beat(step)
            log.clock.restart()  # evaluation time is not training time
    profiler.stop((state, pending))  # fewer steps left than profile_steps
    log.read(pending)
    return state, None


def _stop(run: Run, state: TrainState, step: int, start_step: int, reason: str, log: StepLog) -> dict:
    """End the run at step boundary ``step``, saved (unless nothing was trained since the start)."""
    summary = log.summary
    summary["preempted"], summary["stopped_by"] = step, reason
    if step == start_step:
        run.log(f"stopped ({reason}) before the first step: nothing to save")
        return summary
    run.checkpoints.wait()
    if step not in run.checkpoints.all_steps():  # not just saved on schedule
        log.save(state, step, force=True)
        run.checkpoints.wait()
    run.log(f"stopped ({reason}): checkpoint {step} saved; run the same command to resume")
    return summary


def _finish(run: Run, end: int, final_eval: dict, log: StepLog, profiler) -> dict:
    summary = log.summary
    run.writer.write(end, final_eval, split="eval")
    summary["eval_loss"] = final_eval["loss"]
    summary["tokens_per_sec"] = log.clock.median()
    if summary["tokens_per_sec"]:
        t = run.cfg.train
        summary["step_ms"] = 1e3 * t.batch_size * t.seq_len / summary["tokens_per_sec"]
    if profiler.session is not None:
        summary["profile"] = str(profiler.session)
    if log.save_blocking_ms:
        summary["checkpoint_blocking_ms"] = float(np.median(log.save_blocking_ms))
    if run.proc == 0:
        write_text_atomic(run.workdir / "summary.json", json.dumps(summary, indent=2))
    return summary


def _due(every: int, step: int) -> bool:
    """Whether a periodic action with period ``every`` (0 = never) falls on ``step``."""
    return bool(every) and step % every == 0
