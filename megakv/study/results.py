"""What a study part hands to the report: tables, claims held or not, plots, settings and time taken.

Saved as OUT/<part>/results.json, so `megakv-study report` can rebuild the markdown without rerunning, and
copied beside a report written elsewhere (--report-dir), so a committed report can be rebuilt from its own
directory when a part is rerun alone.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

RESULTS_FILE = "results.json"


@dataclass
class Table:
    caption: str
    columns: list[str]
    rows: list[list[str | float | int | None]]


@dataclass
class Claim:
    """One of the paper's claims, its number there, what this run measured, and whether it held."""

    claim: str
    paper: str
    measured: str
    held: bool | None  # None: not measurable at this scale (the report says why in `measured`)


def no_verdict_unless_finite(claims: list[Claim], losses: Iterable[float]) -> list[Claim]:
    """A part whose measurements hold a NaN or inf gives no verdict: comparisons with NaN are all false, which
    a rule can read as held (a NaN loss was "never worse than the best")."""
    if all(math.isfinite(v) for v in losses):
        return claims
    return [replace(c, held=None, measured=f"{c.measured}; a loss is not finite (NaN or inf): no verdict")
            for c in claims]


@dataclass
class PartResult:
    part: str  # finetune | pretrain | ablation
    title: str
    scale: str
    seconds: float  # wall time of this invocation, cached work excluded
    settings: dict = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    claims: list[Claim] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)  # PNG file names inside OUT/<part>/
    notes: list[str] = field(default_factory=list)
    finished: str = ""  # when these results were built (UTC), set by megakv-study; "" in older files

    def save(self, part_dir: Path) -> Path:
        part_dir.mkdir(parents=True, exist_ok=True)
        path = part_dir / RESULTS_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, path)  # a crash mid-write keeps the previous results
        return path

    @classmethod
    def load(cls, part_dir: Path) -> PartResult:
        path = part_dir / RESULTS_FILE
        try:
            raw = json.loads(path.read_text())
            raw["tables"] = [Table(**t) for t in raw.get("tables", [])]
            raw["claims"] = [Claim(**c) for c in raw.get("claims", [])]
            return cls(**raw)
        except (ValueError, TypeError, AttributeError) as e:  # not JSON, or not a part's results
            raise ValueError(f"{path} is not a study part's results ({type(e).__name__}: {e}): delete it and "
                             "rerun that part") from None
