"""The study's markdown report, rebuilt from each part's results.json (no training or scoring here).

A part's results come from OUT/<part>/ when it ran there, else from REPORT_DIR/<part>/ (the copy an earlier
report kept beside itself): rerunning one part refreshes its section and keeps the others, each marked
with where and when its results were built.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from megakv.study.results import RESULTS_FILE, Claim, PartResult, Table

REPORT_FILE = "report.md"
TITLE = "# megakv-study: Stochastic KV Routing (R-CLA) in miniature"
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


def format_part(result: PartResult, image_dir: str, kept: bool = False) -> list[str]:
    built = f" Results built {result.finished}" if result.finished else " Results built at an unrecorded time"
    built += (": kept from an earlier invocation, this part was not rerun for this report." if kept else ".")
    lines = [f"## {result.title}", "",
             f"Scale `{result.scale}`. The last invocation took {_minutes(result.seconds)}: cached models and "
             "scores are not redone, so the time each training and evaluation took when it ran is in the notes."
             + built, ""]
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


def _same_dir(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def completed_parts(out: Path, parts: Sequence[str], report_dir: Path | None = None,
                    ran: Sequence[str] | None = None) -> list[tuple[PartResult, Path]]:
    """(results, the directory they and their plots are in) per finished part. A part this invocation ran comes
    from OUT; another one from the report's own copy first (what the report showed: OUT may hold an older run of
    it at another scale), then OUT. `ran` None (`megakv-study report`): OUT first, then REPORT_DIR."""
    found = []
    for part in parts:
        sources = [out / part] + ([report_dir / part] if report_dir else [])
        if ran is not None and part not in ran:
            sources.reverse()
        source = next((d for d in sources if (d / RESULTS_FILE).is_file()), None)
        if source is not None:
            found.append((PartResult.load(source), source))
    return found


def _claims_held(results: Sequence[PartResult]) -> str:
    """'N of M claims held', per scale when the parts come from several (their claims do not add up)."""
    scales = sorted({r.scale for r in results})

    def count(of: Sequence[PartResult]) -> str:
        claims = [c for r in of for c in r.claims]
        return f"{sum(c.held is True for c in claims)} of {len(claims)} claims held"

    if len(scales) == 1:
        return count(results)
    per_scale = "; ".join(f"scale {s}: {count([r for r in results if r.scale == s])}" for s in scales)
    return (f"**The parts come from different scales** ({', '.join(f'{r.part} {r.scale}' for r in results)}): "
            f"{per_scale}. Rerun the older parts at one scale to compare them")


def write_report(out: Path, parts: Sequence[str], report_dir: Path | None = None, command: str = "",
                 ran: Sequence[str] | None = None) -> Path:
    """OUT/report.md (or REPORT_DIR/report.md with results.json and the PNGs copied beside it). `ran`: the parts
    this invocation ran (the others are marked as kept from earlier); None for `megakv-study report`."""
    report_dir = report_dir or out
    path = report_dir / REPORT_FILE
    if path.is_file() and not path.read_text(errors="replace").startswith(TITLE):
        raise FileExistsError(f"{path} exists and is not a megakv-study report; it was left as it is. Fix: choose "
                              "another --report-dir (or --out), or move that file away")
    found = completed_parts(out, parts, report_dir, ran)
    if not found:
        raise FileNotFoundError(f"no part of the study has results in {out} (looked for "
                                f"{', '.join(f'{p}/{RESULTS_FILE}' for p in parts)}): run `megakv-study` first")
    report_dir.mkdir(parents=True, exist_ok=True)
    results = [result for result, _ in found]
    lines = [TITLE, "",
             "Regenerate with `bash scripts/study.sh` (set-up, then `megakv-study`; models and scores are cached "
             "under its --out and reused). Each claim is stated next to the paper's number and marked held or "
             "not held by this run's measurements." + (f" Written by `{command}`." if command else ""), "",
             f"{_claims_held(results)}; parts: " + ", ".join(r.part for r in results) + ".", ""]
    for result, source in found:
        target = report_dir / result.part
        if not _same_dir(source, target):
            target.mkdir(exist_ok=True)
            for name in (*result.plots, RESULTS_FILE):
                shutil.copyfile(source / name, target / name)
        kept = result.part not in ran if ran is not None else not _same_dir(source, out / result.part)
        lines += format_part(result, result.part, kept=kept)
    missing = [p for p in parts if p not in {r.part for r in results}]
    if missing:
        lines += [f"Not run yet: {', '.join(missing)}.", ""]
    tmp = path.with_name(f".{REPORT_FILE}.tmp")
    tmp.write_text("\n".join(lines).rstrip() + "\n")
    tmp.replace(path)  # whole or not at all: a kill while writing keeps the previous report
    return path
