"""Stop requests: SIGTERM (preemption) and Ctrl-C end a run at the next step boundary, saved.

``StopSignals`` installs handlers for SIGTERM and SIGINT (main thread only). The first of either
sets ``requested`` (and ``reason``): the training loop stops at the next step boundary and saves a
checkpoint. A second Ctrl-C stops at once: with ``exit_now`` (the command line) the process ends
on the spot, like ``kill -9``, without waiting for anything (a save cut short is cleaned up by the
next run; nothing older is lost); without it ``KeyboardInterrupt`` is raised. Installed before the
trainer is built, so a signal that arrives while data load or compiles is still honoured at the
first boundary. ``restore()`` puts the previous handlers back.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable


class StopSignals:
    def __init__(self, log: Callable[[str], None] | None = None, exit_now: Callable[[], str] | None = None):
        """``exit_now()`` returns the line to print before ending the process on a second Ctrl-C."""
        self.reason: str | None = None  # "SIGTERM" or "Ctrl-C" once requested
        self.log = log
        self.exit_now = exit_now
        self._previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def _handle(self, signum, frame) -> None:
        interrupt = signum == signal.SIGINT
        if self.reason is not None:
            if not interrupt:
                return
            if self.exit_now is None:  # the second Ctrl-C: stop now
                raise KeyboardInterrupt
            sys.stdout.flush()
            print(self.exit_now(), file=sys.stderr, flush=True)
            os._exit(130)  # background save threads would hold an orderly exit back
        self.reason = "Ctrl-C" if interrupt else "SIGTERM"
        if self.log is not None:
            more = "; press Ctrl-C again to stop at once" if interrupt else ""
            self.log(f"{self.reason}: stopping at the next step boundary and saving a checkpoint{more}")

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
