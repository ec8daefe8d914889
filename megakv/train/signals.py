"""SIGTERM / SIGINT / SIGUSR1 (SLURM preemption, a pre-timeout signal, Ctrl-C) -> finish the step, checkpoint,
exit 0. A second SIGTERM or SIGINT aborts at once, without saving (a step can take very long).

The handler only records the request; the loop acts on it at the next step boundary, after the ranks
agree through an all-reduce (a signal may reach only some ranks). One cancellation can arrive several
times within milliseconds (SLURM with proctrack/linuxproc signals every process of the step: the rank,
torchrun, which passes it on, and the node launcher, which does too), so for DUPLICATE_WINDOW_S after the
first SIGTERM/SIGINT both are ignored; then both go back to the system's default action, so a second one
ends the process even inside a long C++ kernel, where no Python handler could run.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
ABORT_ON_SECOND = (signal.SIGTERM, signal.SIGINT)
DUPLICATE_WINDOW_S = 1.0  # repeats of one cancellation arrive within it; a person's second Ctrl-C after it


@dataclass
class StopRequest:
    signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, _frame) -> None:
        self.signal_name = self.signal_name or signal.Signals(signum).name
        if signum in ABORT_ON_SECOND:
            for sig in ABORT_ON_SECOND:  # ignored by the kernel, even inside a long C++ call
                signal.signal(sig, signal.SIG_IGN)
            signal.signal(signal.SIGALRM, self._arm_abort)
            signal.setitimer(signal.ITIMER_REAL, DUPLICATE_WINDOW_S)
            note = (f"megakv-train: {signal.Signals(signum).name} received: saving a checkpoint after this step, "
                    "then exiting; send SIGTERM or SIGINT again to abort at once without saving\n")
            os.write(2, note.encode())  # not logging: a handler may interrupt a logging call holding its lock

    @staticmethod
    def _arm_abort(_signum, _frame) -> None:
        for sig in ABORT_ON_SECOND:
            signal.signal(sig, signal.SIG_DFL)

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self
