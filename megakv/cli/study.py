"""megakv-study: the paper's claims in miniature, regenerated as a markdown report with PNG plots.

    megakv-study [finetune pretrain ablation | all] [--out runs/study] [--scale cpu|gpu|tiny]
    megakv-study report [--out runs/study] [--report-dir DIR]     (re-render only, nothing is trained)

Parts (megakv/study/): finetune (Table 2: SmolLM2-135M fine-tuned with R-CLA vs normally vs untouched),
pretrain (Table 1 / Fig. 5: a q_cross sweep from scratch and shallower full-cache models), ablation
(Table 3: CLA:2, CLA:4, RD-CLA:2 against R-CLA). Each part caches its models and measurements under
OUT/<part>/ and resumes after an interruption; rerunning a finished part only rebuilds its results.
Scales: cpu (the default, a 2-core machine), gpu (the settings for a real run), tiny (seconds; tests).
Exit codes: 0 done, 1 a training run failed (rerun to resume it), 2 bad input, 128 + the signal's number
(143 SIGTERM, 130 SIGINT) stopped by a signal: the running trainings were passed it and saved a checkpoint, and
a rerun resumes them.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from megakv.inference.cli_support import run_cli
from megakv.study import runs
from megakv.study.report import write_report

PARTS = ("finetune", "pretrain", "ablation")
SCALES = ("cpu", "gpu", "tiny")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megakv-study", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["all"], metavar="PART",
                        help=f"any of {', '.join(PARTS)}, 'all', or 'report' (re-render only)")
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="models, caches and results")
    parser.add_argument("--scale", choices=SCALES, default="cpu",
                        help="cpu: the committed report's budgets (hours on 2 cores); gpu: a real run's; tiny: "
                             "the tests' (seconds)")
    parser.add_argument("--report-dir", type=Path, default=None,
                        help="write report.md and copies of the PNGs here instead of OUT")
    return parser


def selected_parts(names: list[str]) -> list[str]:
    unknown = [n for n in names if n not in (*PARTS, "all", "report")]
    if unknown:
        raise ValueError(f"unknown study part(s) {unknown}: choose from {', '.join(PARTS)}, all or report")
    if "report" in names and len(names) > 1:
        raise ValueError("'report' only re-renders the report: give it alone")
    if "all" in names or not names:
        return list(PARTS)
    return [p for p in PARTS if p in names]  # the paper's order, whatever the command line's


def check_report_dir(report_dir: Path | None) -> None:
    """Before anything is trained: --report-dir can be a directory (else the mistake surfaced as "[Errno 17]
    File exists" after hours of training, without naming the option)."""
    if report_dir is None:
        return
    if report_dir.exists() and not report_dir.is_dir():
        raise ValueError(f"--report-dir {report_dir} exists and is not a directory. Fix: give a directory (new or "
                         "existing) for report.md and its plots, or leave --report-dir out to write them under --out")
    existing = next(p for p in (report_dir.absolute(), *report_dir.absolute().parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--report-dir {report_dir} cannot be created: {existing} is not a writable directory. "
                         "Fix: give a --report-dir under a directory you can write, or leave it out")


def log_line(message: str) -> None:
    # One write per line: the part's threads log at once, and print() writes the newline separately.
    sys.stdout.write(f"[megakv-study {time.strftime('%H:%M:%S')}] {message}\n")
    sys.stdout.flush()


@contextlib.contextmanager
def _stop_signals_passed_on(trainings: runs.Trainings):
    """SIGTERM or SIGINT: passed on to the running trainings (they save a checkpoint and exit; the study then
    stops at the end of train_run), or the study stops at once when none runs. Ctrl-C reaches the trainings from
    the terminal too: megakv-train takes the copies as one (megakv/train/signals.py)."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal works in the main thread only
        yield
        return

    def on_stop_signal(signum: int, _frame) -> None:
        if not trainings.stop(signum):
            raise runs.StudyStopped(signum)

    before = {sig: signal.signal(sig, on_stop_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _run(args: argparse.Namespace, command: str) -> int:
    check_report_dir(args.report_dir)
    if args.parts == ["report"]:
        print(write_report(args.out, PARTS, args.report_dir, command))
        return 0
    parts = selected_parts(args.parts)
    trainings = runs.Trainings()
    try:
        with _stop_signals_passed_on(trainings):
            return _run_parts(args, command, parts, trainings)
    except runs.StudyStopped as e:
        print(f"megakv-study: {e}: the trainings that were running saved a checkpoint. Rerun the same command to "
              "resume.", file=sys.stderr)
        return 128 + e.signum


def _run_parts(args: argparse.Namespace, command: str, parts: list[str], trainings: runs.Trainings) -> int:
    for index, part in enumerate(parts, 1):
        trainings.check()
        log_line(f"part {index}/{len(parts)}: {part} (scale {args.scale}, cached under {args.out / part})")
        runner = importlib.import_module(f"megakv.study.{part}")
        start = time.perf_counter()
        try:
            result = runner.run(args.out / part, args.scale, log=log_line, trainings=trainings)
        except subprocess.CalledProcessError as e:
            print(f"megakv-study: error: part {part}: {' '.join(map(str, e.cmd[:6]))} ... failed with exit code "
                  f"{e.returncode}; its log is above. Rerun the same command to resume.", file=sys.stderr)
            return 1
        result.finished = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        result.save(args.out / part)
        log_line(f"part {part} done in {time.perf_counter() - start:.0f} s")
    print(write_report(args.out, PARTS, args.report_dir, command, ran=parts))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    return run_cli("megakv-study", lambda: _run(args, " ".join(["megakv-study", *argv])))


if __name__ == "__main__":
    sys.exit(main())
