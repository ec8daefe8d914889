"""SIGTERM / SIGINT / SIGUSR1 (SLURM preemption, a pre-timeout signal, Ctrl-C) -> finish the step, checkpoint,
exit 0. A second SIGTERM or SIGINT aborts at once, without saving (a step can take very long).

The handler only records the request; the loop acts on it at the next step boundary, after the ranks
agree through an all-reduce (a signal may reach only some ranks). One cancellation can arrive several
times within milliseconds (SLURM with proctrack/linuxproc signals every process of the step: the rank,
torchrun, which passes it on, and the node launcher, which does too), so for DUPLICATE_WINDOW_S after the
first SIGTERM/SIGINT the kernel ignores both; then a thread sets them back to the system's default action
through libc (Python's signal.signal works in the main thread only, which may be inside a long kernel or
collective), so a second one ends the process even there, where no Python handler could run.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
ABORT_ON_SECOND = (signal.SIGTERM, signal.SIGINT)
DUPLICATE_WINDOW_S = 1.0  # repeats of one cancellation arrive within it; a person's second Ctrl-C after it


@dataclass
class StopRequest:
    signal_name: str | None = None
    _before_early: object = None  # SIGUSR1's handler before catch_early, for release_early

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, _frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if signum in ABORT_ON_SECOND:
            for sig in ABORT_ON_SECOND:  # copies of this one are ignored by the kernel ...
                signal.signal(sig, signal.SIG_IGN)
            threading.Thread(target=_default_action_after_window, name="megakv-abort-arming", daemon=True).start()
            note = (f"megakv-train: {signal.Signals(signum).name} received: saving a checkpoint after this step, "
                    f"then exiting; send SIGTERM or SIGINT again (after {DUPLICATE_WINDOW_S:g} s) to abort at once "
                    "without saving\n")
            os.write(2, note.encode())  # not logging: a handler may interrupt a logging call holding its lock

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    def catch_early(self) -> StopRequest:
        """SIGUSR1 only, from the start of the process: a SLURM pre-timeout signal that arrives during the
        launch checks and the rendezvous (minutes on a large job) is kept for the first step boundary instead
        of being lost (the node launcher starts the ranks with it ignored). SIGTERM keeps its default until
        `install`: stopping a launch that has not trained yet loses nothing."""
        self._before_early = signal.signal(signal.SIGUSR1, self._handle)
        return self

    def release_early(self) -> None:
        """Give SIGUSR1 back to its earlier handler (an in-process caller whose launch did not train)."""
        if self._before_early is not None:
            signal.signal(signal.SIGUSR1, self._before_early)
            self._before_early = None


def _default_action_after_window() -> None:
    """... until the window ends; then the default action (terminate), set at the C level from this thread."""
    time.sleep(DUPLICATE_WINDOW_S)
    libc = ctypes.CDLL(None)
    libc.signal.argtypes, libc.signal.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_void_p
    for sig in ABORT_ON_SECOND:
        libc.signal(int(sig), None)  # SIG_DFL is the null handler
