"""SIGTERM / SIGUSR1 (SLURM preemption or a pre-timeout signal) -> finish the step, checkpoint, exit 0.

The handler only records the request; the loop acts on it at the next step boundary, after the ranks
agree through an all-reduce (a signal may reach only some ranks).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


@dataclass
class StopRequest:
    signal_name: str | None = None

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def _handle(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        return self
