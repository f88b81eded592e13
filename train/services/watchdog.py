"""A host thread that ends the process when the training loop stops making progress.

A step blocked in a collective whose peer is stalled or dead never returns to Python, so the
check must live outside the loop: ``beat(step)`` marks progress; after ``timeout_s`` without a
beat the thread prints one line naming the process and the step and exits with status 4 (a
launcher then stops the other processes). ``timeout_s <= 0`` disables it.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from sharding.distributed import prefix


class Watchdog:
    def __init__(self, timeout_s: float, what: str = "step", setting: str = "train.step_timeout_s",
                 program: str = "moe-train"):
        self.timeout_s = timeout_s
        self.what, self.setting, self.program = what, setting, program
        self._step = None
        self._last = None
        self._stop = threading.Event()
        self._thread = None
        if timeout_s > 0:
            self._thread = threading.Thread(target=self._watch, name="switchyard-watchdog", daemon=True)

    def beat(self, step: int) -> None:
        self._step, self._last = step, time.monotonic()
        if self._thread is not None and not self._thread.is_alive():
            self._thread.start()

    def _watch(self) -> None:
        period = max(0.2, min(5.0, self.timeout_s / 10))
        while not self._stop.wait(period):
            idle = time.monotonic() - self._last
            if idle > self.timeout_s:
                print(
                    f"{prefix()}{self.program}: no {self.what} finished for {idle:.0f} s after {self.what} "
                    f"{self._step + 1} ({self.setting}={self.timeout_s:g}): a peer process is stalled or dead; stopping",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(4)

    def stop(self) -> None:
        self._stop.set()
