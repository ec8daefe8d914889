"""Progress of long data jobs: a tqdm bar over input bytes with documents/s and tokens/s, and an ETA."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class OneLinePerUpdate:
    """A log file (SLURM's .out) shows a bar's carriage returns as one endless line: write one line per update."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip("\n")
        if text.strip():
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar_stream(interactive: bool):
    """Where a tqdm bar writes: the terminal as it is, a log file one line per update."""
    return sys.stderr if interactive else OneLinePerUpdate(sys.stderr)


class Progress:
    """Bar total = input bytes (ETA from the read rate); postfix = written documents/s and tokens/s."""

    def __init__(self, total_bytes: int, desc: str, enabled: bool = True):
        interactive = sys.stderr.isatty()
        self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                         disable=not enabled, mininterval=0.5 if interactive else 30.0, dynamic_ncols=interactive,
                         file=bar_stream(interactive))
        self._start = time.time()
        self._last_postfix = 0.0
        self.documents = 0
        self.tokens = 0

    def read_to(self, position: int) -> None:
        step = min(position, self._bar.total) - self._bar.n
        if step > 0:
            self._bar.update(step)

    def wrote(self, documents: int, tokens: int) -> None:
        self.documents += documents
        self.tokens += tokens
        now = time.time()
        if now - self._last_postfix >= 0.5:
            self._last_postfix = now
            elapsed = max(now - self._start, 1e-9)
            self._bar.set_postfix_str(f"{self.documents / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tok/s",
                                      refresh=False)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
