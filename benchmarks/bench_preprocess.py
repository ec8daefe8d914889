"""Preprocessing throughput (tokens/s) with 1 and 2 workers, and peak memory.

    python benchmarks/bench_preprocess.py                    # the demo corpus (Shakespeare, 8k BPE)
    python benchmarks/bench_preprocess.py --mix data/mix     # also the larger mix (fetched there if absent)

Every measurement runs in a fresh process, which reports its own peak RSS (resource.getrusage) and that
of its worker processes, and the CPU seconds of both (CPU time, unlike wall time, does not depend on what
else the machine runs: compare it across worker counts to see the pool's overhead). The worker counts run
`--repeats` times each in mirrored order (1, 2, 2, 1, ...), so a change in the machine's load affects all
alike, and each corpus ends with the ratios to the first worker count: tokens/s (fastest run of each) and
CPU seconds (least of each). A worker RSS of "-" means no worker process (1 worker encodes in the main
process). Corpora are fetched into $MEGAKV_CACHE (default ~/.cache/megakv) and prepared in --scratch
(default: a temporary directory).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megakv.data.tokenizer import read_info


def child(args: argparse.Namespace) -> None:
    from megakv.data.preprocess import preprocess

    started = time.perf_counter()
    summary = preprocess(args.inputs, args.tokenizer, args.output, workers=args.workers, progress=False)
    seconds = time.perf_counter() - started
    own, workers = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    print(json.dumps({
        "cpu_seconds": own.ru_utime + own.ru_stime + workers.ru_utime + workers.ru_stime,
        "documents": summary.documents, "tokens": summary.tokens, "bytes": summary.input_bytes,
        "seconds": seconds,
        "peak_rss_main_mib": own.ru_maxrss / 1024,
        "peak_rss_worker_mib": workers.ru_maxrss / 1024,
    }))


def measure(inputs: list[str], tokenizer: Path, output: Path, workers: int) -> dict:
    shutil.rmtree(output.parent, ignore_errors=True)  # an earlier identical run would make this one a no-op
    cmd = [sys.executable, __file__, "--child", "--workers", str(workers), "--tokenizer", str(tokenizer),
           "--output", str(output), "--inputs", *inputs]
    run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if run.returncode != 0:
        raise SystemExit(f"benchmark run failed:\n{run.stderr}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def corpus_inputs(name: str, directory: Path, vocab_size: int) -> tuple[list[str], Path]:
    """Raw training jsonl files of a corpus and a tokenizer for it (fetched / trained once)."""
    from megakv.data.recipes import fetch_corpus, train_texts
    from megakv.data.tokenizer import METADATA_FILE, train_sentencepiece

    raw = sorted((directory / "raw").glob("*_train.jsonl"))
    tokenizer = directory / "tokenizer"
    if not raw:
        fetch_corpus(name, directory)
        raw = sorted((directory / "raw").glob("*_train.jsonl"))
    if not (tokenizer / METADATA_FILE).exists():
        train_sentencepiece(train_texts({p.stem: {"train": p} for p in raw}), tokenizer, vocab_size)
    return [str(p) for p in raw], tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--inputs", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--scratch", help="directory for corpora and outputs (default: temporary)")
    p.add_argument("--mix", help="directory of the larger mix (prepared by `megakv-data mix`, or fetched here)")
    p.add_argument("--worker-counts", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=2, help="runs of each worker count, in mirrored order")
    args = p.parse_args()
    if args.child:
        child(args)
        return
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    counts = list(dict.fromkeys(args.worker_counts))
    order = [w for r in range(args.repeats) for w in (counts if r % 2 == 0 else counts[::-1])]
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(args.scratch or tmp)
        corpora = [("shakespeare", *corpus_inputs("shakespeare", scratch / "shakespeare", 8000))]
        if args.mix:
            corpora.append(("mix", *corpus_inputs("mix", Path(args.mix), 32000)))
        print(f"{'corpus':12} {'vocab':>6} {'workers':>7} {'docs':>7} {'tokens':>11} {'MiB':>6} {'seconds':>7} "
              f"{'tokens/s':>10} {'MiB/s':>6} {'CPU s':>6} {'peak RSS main / worker MiB':>27}")
        for label, inputs, tokenizer in corpora:
            vocab = read_info(tokenizer).vocab_size
            runs: dict[int, list[dict]] = {w: [] for w in counts}
            for workers in order:
                r = measure(inputs, tokenizer, scratch / "bench_out" / label / f"w{workers}" / "out", workers)
                runs[workers].append(r)
                mib = r["bytes"] / 2**20
                worker_rss = f"{r['peak_rss_worker_mib']:.0f}" if r["peak_rss_worker_mib"] > 0 else "-"
                print(f"{label:12} {vocab:>6,} {workers:>7} {r['documents']:>7,} {r['tokens']:>11,} {mib:>6.1f} "
                      f"{r['seconds']:>7.2f} {r['tokens'] / r['seconds']:>10,.0f} {mib / r['seconds']:>6.2f} "
                      f"{r['cpu_seconds']:>6.1f} "
                      f"{r['peak_rss_main_mib']:>14.0f} / {worker_rss:<8}", flush=True)
            base = counts[0]
            fastest = {w: min(x["seconds"] for x in rs) for w, rs in runs.items()}
            cpu = {w: min(x["cpu_seconds"] for x in rs) for w, rs in runs.items()}
            for workers in counts[1:]:
                print(f"{label}: {workers} / {base} workers: tokens/s {fastest[base] / fastest[workers]:.2f} "
                      f"(fastest of {args.repeats} runs each), CPU seconds {cpu[workers] / cpu[base]:.2f}; "
                      f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)


if __name__ == "__main__":
    main()
