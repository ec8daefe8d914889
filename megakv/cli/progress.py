"""A progress bar (rate and ETA) for the command-line tools' long steps: evaluations, searches, conversions."""

from __future__ import annotations

import sys

from tqdm import tqdm

from megakv.data.progress import bar_stream


class ProgressBar:
    """tqdm on stderr; `advance(n)` after each piece of work. Redraws every 0.5 s on a terminal, every
    30 s in a log file, and not at all when disabled."""

    def __init__(self, total: int | None, desc: str, unit: str, enabled: bool = True, unit_scale: bool = False):
        """unit_scale: show counts as k/M/G (for bytes)."""
        interactive = sys.stderr.isatty()
        self._bar = tqdm(total=total, desc=desc, unit=unit if unit_scale else f" {unit}", disable=not enabled,
                         file=bar_stream(interactive), mininterval=0.5 if interactive else 30.0,
                         dynamic_ncols=interactive,
                         unit_scale=unit_scale, unit_divisor=1024 if unit_scale else 1000)

    def advance(self, n: int = 1) -> None:
        self._bar.update(n)

    def show(self, done: int, total: int) -> None:
        """Set the position and the total (for work whose size is known only once it has started)."""
        self._bar.total = total
        self._bar.update(done - self._bar.n)

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
