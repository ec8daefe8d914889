"""Training throughput of the demo model, from one run of this script.

Prints, for 2 CPU processes (gloo) unless told otherwise:
  - training tokens/s with R-CLA routing on vs off (ratio; the goal is that routing costs nothing: <= 1.00),
  - ZeRO 1/2/3 relative throughput (R-CLA on),
  - achieved model FLOP/s as a fraction of this machine's matrix-multiply peak, measured in the same run
    (before and after the training runs; the better of the two) with the same number of single-threaded
    processes running fp32 2048^3 matmuls at once.

Other processes on the machine distort everything: the load average is printed with the results.

Each configuration is a real `megakv-train` launch (the demo recipe with short-run overrides); tokens/s is
the median over the steps after the first `--warmup` ones, read from the run's metrics.jsonl.

  .venv/bin/python benchmarks/bench_train.py [--steps 10] [--nproc 2] [--stages 1,2,3] [KEY=VALUE ...]

Without the demo data (`megakv-data demo --output data/shakespeare`), a seeded synthetic corpus stands in
(throughput does not depend on the text).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "megakv" / "recipes" / "demo.yaml"
ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1"}


# ----------------------------------------------------------------------------- matmul peak
def _matmul_worker(size: int, seconds: float, out) -> None:
    import torch

    torch.set_num_threads(1)
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    out.put(2 * size**3 * count / (time.perf_counter() - start))


def matmul_peak(nproc: int, size: int = 2048, seconds: float = 4.0) -> float:
    """Sum of fp32 GEMM FLOP/s of `nproc` single-threaded processes running at the same time."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_matmul_worker, args=(size, seconds, queue)) for _ in range(nproc)]
    for p in procs:
        p.start()
    rates = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


# ----------------------------------------------------------------------------- model FLOPs
def model_flops_per_token(model_cfg) -> float:
    """6 x matmul parameters (forward + backward) + causal attention scores/values (6 x layers x seq x width)."""
    import torch

    from megakv.model import MegaKVModel

    with torch.device("meta"):
        model = MegaKVModel(model_cfg)
    matmul_params = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and not n.startswith("embed."))
    if model_cfg.tie_embeddings:
        matmul_params += model.embed.weight.numel()  # the tied output projection is still a matmul
    width = model_cfg.n_heads * model_cfg.resolved_head_dim
    attention = 6 * model_cfg.n_layers * model_cfg.max_seq_len * width
    return 6 * matmul_params + attention


# ----------------------------------------------------------------------------- training runs
def run_training(run_dir: Path, overrides: list[str], nproc: int, timeout: float) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(_free_port()), "-m", "megakv.cli.train", str(DEMO), f"train.run_dir={run_dir}", *overrides]
    done = subprocess.run(cmd, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=timeout)
    metrics = run_dir / "metrics.jsonl"
    if done.returncode != 0 or not metrics.is_file():
        raise RuntimeError(f"training failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step_rates(records: list[dict], warmup: int) -> list[float]:
    return [r["train/tokens_per_s"] for r in records if "train/tokens_per_s" in r and r["step"] > warmup]


# ----------------------------------------------------------------------------- data
def synthetic_dataset(root: Path, documents: int = 3000) -> Path:
    """Throughput does not depend on the text: without prepared demo data, tokenize a seeded synthetic corpus."""
    import random

    from megakv.data.preprocess import preprocess
    from megakv.data.tokenizer import train_sentencepiece

    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(3000)]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(100, 400))) for _ in range(documents)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_sentencepiece(docs, root / "tokenizer_src", 1024)
    prefix = root / "data" / "synthetic"
    preprocess([str(corpus)], root / "tokenizer_src", prefix, workers=1, progress=False)
    return prefix


def demo_data_overrides(cfg, root: Path) -> list[str]:
    """Overrides that point a demo-recipe run at a synthetic corpus when the recipe's data is not prepared (a
    fresh clone): its training shards, and no held-out set, tokenizer or validation; [] when it is prepared.
    Relative data paths are the recipe's, read from the repository root (where the runs start)."""
    from megakv.data.indexed import pair_exists

    def prepared(prefix) -> bool:
        path = Path(prefix)
        return pair_exists(path if path.is_absolute() else REPO / path)

    if not all(prepared(p) for p in cfg.data.datasets):
        prefix = synthetic_dataset(root / "synthetic")
        print(f"demo data {cfg.data.datasets} not prepared: using a synthetic corpus ({prefix}), no held-out set",
              flush=True)
        return [f"data.datasets=[{prefix}]", "data.valid_datasets=[]", "data.tokenizer=null", "validation.every=0"]
    if not all(prepared(p) for p in cfg.data.valid_datasets):
        print(f"held-out data {cfg.data.valid_datasets} not prepared: training without it", flush=True)
        return ["data.valid_datasets=[]", "validation.every=0"]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--stages", default="1,2,3")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each of R-CLA on / off")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (e.g. data paths)")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps <= args.warmup or args.repeats < 1:
        parser.error("--steps must exceed --warmup (>= 0) and --repeats be >= 1: no step would be measured")
    os.environ.update(ENV)

    from megakv.config import load_config

    tmp_root = Path(tempfile.mkdtemp(prefix="bench_train_"))
    cfg = load_config(DEMO, args.overrides)
    args.overrides = [*args.overrides, *demo_data_overrides(cfg, tmp_root)]
    flops_token = model_flops_per_token(cfg.model)
    short = [f"train.steps={args.steps}", "validation.every=0", "checkpoint.every=0", "checkpoint.save_final=false",
             "logging.tensorboard=false", f"logging.log_every={args.steps}", "optim.warmup_steps=1",
             *args.overrides]
    peaks = [matmul_peak(args.nproc)]  # measured again at the end: the best of both is the peak
    stage = cfg.parallel.zero_stage
    others = [("rcla", int(s)) for s in args.stages.split(",") if int(s) != stage]
    # The R-CLA on/off pair runs `repeats` times in mirrored order (on, off, ..., off, on), so slow drift in
    # the machine's load affects both alike; every run's post-warm-up step rates are pooled per config.
    pair = [("rcla", stage), ("none", stage)]
    order = []
    for r in range(args.repeats):
        order += pair if r % 2 == 0 else pair[::-1]
        if r == 0:
            order += others
    rates: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="runs_", dir=tmp_root) as tmp:
        for index, (strategy, zero) in enumerate(order):
            name = f"{strategy}-zero{zero}"
            records = run_training(Path(tmp) / f"{index}-{name}", [*short, f"routing.strategy={strategy}",
                                                                  f"parallel.zero_stage={zero}",
                                                                  "parallel.ds_fragment=null"],
                                   args.nproc, args.timeout)
            run_rates = step_rates(records, args.warmup)
            rates.setdefault(name, []).extend(run_rates)
            print(f"  run {index + 1}/{len(order)} {name:12s} {statistics.median(run_rates):8,.0f} tokens/s",
                  flush=True)
    results = {name: statistics.median(values) for name, values in rates.items()}
    peaks.append(matmul_peak(args.nproc))
    peak = max(peaks)
    print(f"(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    base, off = f"rcla-zero{stage}", f"none-zero{stage}"
    print(f"\nmodel: {cfg.model.n_layers} layers, d={cfg.model.d_model}, seq {cfg.model.max_seq_len}, "
          f"vocab {cfg.model.vocab_size}; global batch {cfg.train.global_batch}, micro-batch {cfg.train.micro_batch}, "
          f"{args.nproc} processes, {cfg.train.precision}")
    print(f"R-CLA on vs off (ZeRO {cfg.parallel.zero_stage}): {results[base]:,.0f} vs {results[off]:,.0f} tokens/s; "
          f"R-CLA cost (time per token on / off) = {results[off] / results[base]:.3f} (goal <= 1.00)")
    for zero in sorted(int(s) for s in args.stages.split(",")):
        name = f"rcla-zero{zero}"
        print(f"ZeRO {zero}: {results[name]:,.0f} tokens/s, relative {results[name] / results[base]:.2f}")
    print(f"matmul peak ({args.nproc} processes x 1 thread, fp32 2048^3 GEMM, best of start/end "
          f"{peaks[0] / 1e9:.1f}/{peaks[1] / 1e9:.1f}): {peak / 1e9:.1f} GFLOP/s")
    for name, rate in results.items():
        achieved = rate * flops_token
        print(f"{name:12s} model FLOP/s {achieved / 1e9:6.1f} G = {achieved / peak:.1%} of the measured peak")
    shutil.rmtree(tmp_root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
