"""The training loop as a recipe: dispatch a step, read the previous one back, act on the schedule.

``Trainer`` (built by ``train.core.setup.TrainerSetup``) runs steps until ``train.steps``. The
loop never waits on the step it just dispatched: after dispatching step N it reads step N-1's
metrics (``StepLog``), so host work overlaps device work. Around that, small parts: a
throughput clock (``Throughput``), periodic actions (checkpoint, evaluation, a profile of a few
steps), the stop signals (SIGTERM, Ctrl-C: ``train.services.signals``) as the step's own input, and a
watchdog for stalled peers.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from moe.costs import flops_per_token
from train.core.setup import TrainerSetup
from train.core.step import score
from train.data.batches import eval_batches
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


class StepLog:
    """Reads a dispatched step's metrics back, writes its row, and keeps the run's summary, the
    stop flag every process sees, and the guard against non-finite steps."""

    def __init__(self, trainer, clock: Throughput, watchdog: Watchdog, end: int):
        self.trainer, self.clock, self.watchdog, self.end = trainer, clock, watchdog, end
        self.summary: dict = {"first_loss": None, "last_loss": None, "tokens_per_sec": None, "skipped_steps": 0}
        self.stop_requested = False  # some process was signalled (read back from a step)
        self.nonfinite_run = 0

    def read(self, pending) -> None:
        """Wait for step ``pending = (step, device metrics, the router probe's routes or None)`` (if
        any) and account for it."""
        if pending is None:
            return
        step, dev_metrics, routes = pending
        host, routes = jax.device_get((dev_metrics, routes))  # waits for that step only
        self.watchdog.beat(step)
        self.trainer.steps_done += 1
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
        cfg = self.trainer.cfg
        if routes is not None:
            host.update(self.trainer.probe.metrics(routes))
        if self.logs(step) or skipped:
            self._write(step + 1, host, None if skipped else now)
        if skipped:
            what = "non-finite loss or gradient" if host["nonfinite"] else "loss spike"
            self.trainer.log(f"step {step + 1}: update skipped ({what}); parameters, optimizer and model state unchanged")
        limit = cfg.train.max_nonfinite_steps
        if self.nonfinite_run >= limit:
            raise NonFiniteError(
                f"train: step {step + 1} ends {self.nonfinite_run} non-finite steps in a row "
                f"(train.max_nonfinite_steps={limit}); stopped without saving a checkpoint. "
                f"The last good checkpoint is in {self.trainer.checkpoints.directory}"
            )

    def logs(self, step: int) -> bool:
        """Whether step ``step`` (0-based) writes a row on schedule."""
        return (step + 1) % self.trainer.cfg.log_every_steps == 0 or step + 1 == self.end

    def _write(self, step: int, host: dict, now: float | None) -> None:
        row = {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in host.items()}
        # null until a timed window exists (the first step compiles); a skipped step is not timed
        row["tokens_per_sec"], row["mfu"] = self.clock.sample(now) if now is not None else (None, None)
        self.trainer.writer.write(step, row)


class Trainer(TrainerSetup):
    """``Trainer(cfg, workdir).run()`` trains; ``close()`` after (see ``TrainerSetup`` for the parts)."""

    def evaluate(self) -> dict[str, float]:
        cfg = self.cfg
        batches = eval_batches(
            self.val_corpus.tokens, cfg.train.seq_len, cfg.train.batch_size, cfg.eval_batches, self.proc, self.nproc
        )
        with self.context():
            return score(self.eval_step, self.state.params, self.state.model_state, batches, self.global_batch,
                         self.val_corpus.num_bytes, len(self.val_corpus.tokens))

    def run(self, stop_at: int | None = None, signals: StopSignals | None = None) -> dict:
        """Train to ``train.steps`` (or stop after step ``stop_at``, checkpointed, as an interruption would).

        SIGTERM (preemption) or Ctrl-C (``signals``, installed here unless given) stops at the next
        step boundary: a checkpoint of the current step is saved (unless no step was taken since the
        last one), waited for, and the summary says ``preempted`` (the step) and ``stopped_by``. A
        signal to any process stops all of them after the same step (the flag is the step's ``stop``
        input, reduced in the step). ``train.max_nonfinite_steps`` consecutive skipped (non-finite)
        updates raise ``NonFiniteError`` without a new checkpoint."""
        cfg, t = self.cfg, self.cfg.train
        start_step = int(self.state.step)
        end = t.steps if stop_at is None else min(stop_at, t.steps)
        if start_step and start_step >= end:
            return self._nothing_to_do(start_step, end, stop_at)
        own_signals = signals is None
        signals = StopSignals(self.log) if own_signals else signals
        # armed at the first finished step: compiling is not stalling
        watchdog = Watchdog(t.step_timeout_s or (900.0 if self.nproc > 1 else 0.0))
        profiler = StepProfiler(self.workdir / "profile", cfg.profile_steps, enabled=self.proc == 0, log=self.log)
        peak = cfg.peak_flops_per_device or metrics_lib.peak_flops_per_device(self.devices[0].device_kind, cfg.model.dtype)
        clock = Throughput(t.batch_size * t.seq_len, flops_per_token(cfg.model, t.seq_len), len(self.devices), peak)
        log = StepLog(self, clock, watchdog, end)
        try:
            with self.context():
                stopped = self._train_steps(start_step, end, signals, log, profiler)
                if stopped is not None:
                    return stopped
                if self.checkpoints.latest_step() != end:
                    self.save_checkpoint(end, force=True)
            watchdog.beat(end - 1)
            final_eval = self.evaluate()
        finally:
            profiler.finish()  # a trace still running here (preemption, error) stops without waiting
            watchdog.stop()
            if own_signals:
                signals.restore()
        return self._finish(end, final_eval, log.summary, clock, profiler)

    def _nothing_to_do(self, reached: int, end: int, stop_at: int | None) -> dict:
        """A resumed run asked to end at or before the step it restored: no step, checkpoint, metrics
        row or summary is written (one below ``reached`` would hold a later state under an earlier name)."""
        asked = f"train.steps={self.cfg.train.steps}" if end == self.cfg.train.steps else f"stop_at={stop_at}"
        self.log(f"{asked}: the run in {self.workdir} is already at step {reached}; nothing to do")
        return {"nothing_to_do": True, "reached": reached, "end": end}

    def _train_steps(self, start_step, end, signals, log: StepLog, profiler) -> dict | None:
        """The steps; a summary if a stop signal ended them early, else None."""
        cfg = self.cfg
        pending = None  # (step, device metrics, probe routes) of the step dispatched last
        for step in range(start_step, end):
            if self.nproc == 1 and signals.requested:  # alone: stop at this boundary, no step more
                log.read(pending)
                return self._stop(step, start_step, signals.reason, log.summary)
            batch = self.global_batch(next(self.batches))
            profiler.maybe_start(step + 1, warm=step > start_step, previous=self.state)  # after the compiling step
            with profiler.annotate(step + 1):
                self.state, dev_metrics = self.jit_step(self.state, batch, self.stop_flags(signals.requested))
            routes = None
            if log.logs(step) and self.probe is not None:  # router telemetry of the state this step made
                routes = self.routing_probe()
            profiler.step_done((self.state, dev_metrics, routes))
            log.read(pending)
            pending = (step, dev_metrics, routes)
            if log.stop_requested:  # read back from the previous step: every process stops after this one
                log.read(pending)
                return self._stop(step + 1, start_step, signals.reason or "a signal to another process", log.summary)
            if _due(cfg.checkpoint.every_steps, step + 1) and step + 1 < end:
                self.save_checkpoint(step + 1)  # asynchronous: blocks only for the device-to-host copy
            if _due(cfg.eval_every_steps, step + 1) and step + 1 < cfg.train.steps:
                log.read(pending)
                pending = None
                self.writer.write(step + 1, self.evaluate(), split="eval")
                log.watchdog.beat(step)
                log.clock.restart()  # evaluation time is not training time
        profiler.stop((self.state, pending))  # fewer steps left than profile_steps
        log.read(pending)
        return None

    def _stop(self, step: int, start_step: int, reason: str, summary: dict) -> dict:
        """End the run at step boundary ``step``, saved (unless nothing was trained since the start)."""
        summary["preempted"], summary["stopped_by"] = step, reason
        if step == start_step:
            self.log(f"stopped ({reason}) before the first step: nothing to save")
            return summary
        self.checkpoints.wait()
        if step not in self.checkpoints.all_steps():  # not just saved on schedule
            self.save_checkpoint(step, force=True)
            self.checkpoints.wait()
        self.log(f"stopped ({reason}): checkpoint {step} saved; run the same command to resume")
        return summary

    def _finish(self, end: int, final_eval: dict, summary: dict, clock: Throughput, profiler) -> dict:
        self.writer.write(end, final_eval, split="eval")
        summary["eval_loss"] = final_eval["loss"]
        summary["tokens_per_sec"] = clock.median()
        if summary["tokens_per_sec"]:
            t = self.cfg.train
            summary["step_ms"] = 1e3 * t.batch_size * t.seq_len / summary["tokens_per_sec"]
        if profiler.session is not None:
            summary["profile"] = str(profiler.session)
        if self.save_blocking_ms:
            summary["checkpoint_blocking_ms"] = float(np.median(self.save_blocking_ms))
        if self.proc == 0:
            write_text_atomic(self.workdir / "summary.json", json.dumps(summary, indent=2))
        return summary

    def close(self, abandon: bool = False):
        """Wait for a save in flight and close the logs; ``abandon`` (a run that stopped before its
        first step) also removes what this run added to the workdir."""
        self.checkpoints.close()  # waits for a save in flight
        self.writer.close()
        if self.folder is not None:
            if abandon:
                self.folder.abandon()
            self.folder.release()


def _due(every: int, step: int) -> bool:
    """Whether a periodic action with period ``every`` (0 = never) falls on ``step``."""
    return bool(every) and step % every == 0
