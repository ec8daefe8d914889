"""The study's markdown report, rebuilt from each part's results.json (no training or scoring here)."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from megakv.study.results import RESULTS_FILE, Claim, PartResult, Table

REPORT_FILE = "report.md"
HELD_MARK = {True: "**held**", False: "**not held**", None: "not measurable here"}


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value).replace("|", "\\|")


def format_table(table: Table) -> list[str]:
    lines = [f"*{table.caption}*", "", "| " + " | ".join(table.columns) + " |",
             "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.rows]
    return [*lines, ""]


def format_claims(claims: Sequence[Claim]) -> list[str]:
    lines = ["| claim | paper | measured here | verdict |", "|---|---|---|---|"]
    lines += [f"| {_cell(c.claim)} | {_cell(c.paper)} | {_cell(c.measured)} | {HELD_MARK[c.held]} |" for c in claims]
    return [*lines, ""]


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def format_part(result: PartResult, image_dir: str) -> list[str]:
    lines = [f"## {result.title}", "",
             f"Scale `{result.scale}`. The last invocation took {_minutes(result.seconds)}: cached models and "
             "scores are not redone, so the time each training and evaluation took when it ran is in the notes.",
             ""]
    if result.settings:
        lines += ["Settings: " + "; ".join(f"{k} = `{v}`" for k, v in result.settings.items()), ""]
    if result.claims:
        lines += format_claims(result.claims)
    for table in result.tables:
        lines += format_table(table)
    lines += [f"![{plot}]({image_dir}/{plot})" for plot in result.plots]
    if result.plots:
        lines.append("")
    lines += [f"- {note}" for note in result.notes]
    return [*lines, ""] if result.notes else lines


def completed_parts(out: Path, parts: Sequence[str]) -> list[PartResult]:
    return [PartResult.load(out / part) for part in parts if (out / part / RESULTS_FILE).is_file()]


def write_report(out: Path, parts: Sequence[str], report_dir: Path | None = None, command: str = "") -> Path:
    """OUT/report.md (or REPORT_DIR/report.md with the PNGs copied beside it) from the finished parts."""
    results = completed_parts(out, parts)
    if not results:
        raise FileNotFoundError(f"no part of the study has results in {out} (looked for "
                                f"{', '.join(f'{p}/{RESULTS_FILE}' for p in parts)}): run `megakv-study` first")
    report_dir = report_dir or out
    report_dir.mkdir(parents=True, exist_ok=True)
    claims = [c for r in results for c in r.claims]
    held = sum(c.held is True for c in claims)
    lines = ["# megakv-study: Stochastic KV Routing (R-CLA) in miniature", "",
             "Regenerate with `bash scripts/study.sh` (set-up, then `megakv-study`; models and scores are cached "
             "under its --out and reused). Each claim is stated next to the paper's number and marked held or "
             "not held by this run's measurements." + (f" Written by `{command}`." if command else ""), "",
             f"{held} of {len(claims)} claims held; parts: " + ", ".join(r.part for r in results) + ".", ""]
    for result in results:
        image_dir = result.part
        if report_dir != out:
            (report_dir / result.part).mkdir(exist_ok=True)
            for plot in result.plots:
                shutil.copyfile(out / result.part / plot, report_dir / result.part / plot)
        lines += format_part(result, image_dir)
    missing = [p for p in parts if p not in {r.part for r in results}]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)}.", ""]
    path = report_dir / REPORT_FILE
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
