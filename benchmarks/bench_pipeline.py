"""Pipeline parallelism with K/V crossing stages, from one run of this script.

Prints:
  1. bytes sent forward across each stage boundary per micro-batch (the backward sends as many again):
     hidden only (what a pipeline without cross-layer K/V sends), megakv (hidden + the K/V of the
     crossing set, mean and p99 over sampled R-CLA plans; and what the `fixed` transport pads to), and an
     all-earlier-K/V bank, for the demo shape and for a 28-layer 4-stage Qwen2.5-1.5B-like shape (bf16,
     4096 tokens per micro-batch) at q_cross 0.5. Computed from plans (routing.crossing), no training.
     Goal: megakv <= half of the all-earlier bank.
  2. tokens/s of real `megakv-train` runs of the demo recipe on this machine: 1 process, DP=2, and PP=2
     with the fixed and the dynamic transport (same global batch; ZeRO-1 for all), and PP=2 with
     micro-batches half as large (more micro-batches per step, smaller bubble). Goal: PP2 >= 0.8 x DP2.
  3. the 1F1B bubble fraction (P - 1) / (M + P - 1) of each pipeline run, and the measured pipeline
     efficiency: tokens/s of PP=2 / (2 x tokens/s of one process).
With `--repeats N` the five trainings run N times each in mirrored order (1-5, 5-1, ...), so a change in
the machine's load affects all alike; a configuration's tokens/s is the median of its post-warm-up steps,
pooled over its runs. The default is one run each, one after another, as before: every run is a fresh
launch with its own start-up, so mirrored repeats add about half the time again even with fewer steps per
run; on a machine shared with other jobs, pass e.g. --repeats 2 --steps 5.

  .venv/bin/python benchmarks/bench_pipeline.py [--steps 8] [--warmup 2] [--repeats 1] [--plans 2000]
      [--skip-training]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import DEMO, ENV, demo_data_overrides, run_training, step_rates  # noqa: E402


def boundary_table(model_cfg, cuts: list[int], tokens: int, element_size: int, plans: int, q_cross: float,
                   max_distance: int | None = None) -> list[dict]:
    import numpy as np

    from megakv.parallel.pipeline import boundary_bytes, kv_width, max_slots
    from megakv.routing import sample_plan

    per_source = 2 * tokens * kv_width(model_cfg) * element_size
    rows = []
    for c in cuts:
        megakv = []
        for step in range(plans):
            plan = sample_plan("rcla", model_cfg.n_layers, q_cross=q_cross, seed=0, step=step,
                               max_distance=max_distance)
            megakv.append(boundary_bytes(model_cfg, plan, c, tokens, element_size)["megakv"])
        fixed = boundary_bytes(model_cfg, sample_plan("none", model_cfg.n_layers, q_cross=0.0, seed=0, step=0), c,
                               tokens, element_size)["hidden_only"]
        fixed += max_slots(model_cfg.n_layers, c, max_distance) * per_source
        last = boundary_bytes(model_cfg, plan, c, tokens, element_size)
        rows.append({"c": c, "hidden": last["hidden_only"], "mean": float(np.mean(megakv)),
                     "p99": float(np.percentile(megakv, 99)), "fixed": fixed, "bank": last["all_earlier"]})
    return rows


def print_table(title: str, rows: list[dict]) -> None:
    mib = 2**20
    print(f"\n{title}")
    print(f"{'boundary':>9} {'hidden only':>12} {'megakv mean':>12} {'megakv p99':>11} {'fixed slots':>12} "
          f"{'all earlier':>12} {'mean/bank':>10}")
    for r in rows:
        print(f"{r['c']:>9} {r['hidden'] / mib:>10.2f}Mi {r['mean'] / mib:>10.2f}Mi {r['p99'] / mib:>9.2f}Mi "
              f"{r['fixed'] / mib:>10.2f}Mi {r['bank'] / mib:>10.2f}Mi {r['mean'] / r['bank']:>10.2f}")
    total = {key: sum(r[key] for r in rows) for key in ("hidden", "mean", "fixed", "bank")}
    if len(rows) > 1:
        print(f"{'all':>9} {total['hidden'] / mib:>10.2f}Mi {total['mean'] / mib:>10.2f}Mi {'':>11} "
              f"{total['fixed'] / mib:>10.2f}Mi {total['bank'] / mib:>10.2f}Mi {total['mean'] / total['bank']:>10.2f}")


def bytes_section(plans: int) -> None:
    from megakv.config import ModelConfig, load_config

    demo = load_config(DEMO, [])
    tokens = demo.train.micro_batch * demo.model.max_seq_len
    print_table(f"demo shape ({demo.model.n_layers} layers, d={demo.model.d_model}, {demo.model.n_kv_heads} KV heads, "
                f"{tokens} tokens per micro-batch, fp32), PP=2, q_cross {demo.routing.q_cross}, {plans} plans",
                boundary_table(demo.model, [demo.model.n_layers // 2], tokens, 4, plans, demo.routing.q_cross))
    qwen = ModelConfig(vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, ffn_hidden=8960,
                       max_seq_len=4096, head_dim=128, qkv_bias=True, family="qwen2")
    print_table(f"28 layers, d=1536, 2 KV heads x 128 (Qwen2.5-1.5B-like), 4096 tokens, bf16, PP=4, q_cross 0.5, "
                f"{plans} plans", boundary_table(qwen, [7, 14, 21], 4096, 2, plans, 0.5))
    print_table("the same with routing.max_distance=4", boundary_table(qwen, [7, 14, 21], 4096, 2, plans, 0.5, 4))


def training_section(steps: int, warmup: int, repeats: int, timeout: float) -> None:
    from megakv.config import load_config

    tmp_root = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    cfg = load_config(DEMO, [])
    print()
    extra = demo_data_overrides(cfg, tmp_root)
    short = [f"train.steps={steps}", "validation.every=0", "checkpoint.every=0", "checkpoint.save_final=false",
             "logging.tensorboard=false", f"logging.log_every={steps}", "optim.warmup_steps=1",
             "parallel.zero_stage=1", "parallel.ds_fragment=null", *extra]
    half = cfg.train.micro_batch // 2
    runs = [("1 process", 1, []), ("DP=2", 2, []),
            ("PP=2 fixed", 2, ["parallel.pipeline=2", "parallel.pipeline_transport=fixed"]),
            ("PP=2 dynamic", 2, ["parallel.pipeline=2", "parallel.pipeline_transport=dynamic"]),
            (f"PP=2 fixed, micro-batch {half}", 2, ["parallel.pipeline=2", f"train.micro_batch={half}"])]
    order = [run for r in range(repeats) for run in (runs if r % 2 == 0 else runs[::-1])]
    pooled: dict[str, list[float]] = {name: [] for name, _, _ in runs}
    for index, (name, nproc, overrides) in enumerate(order):
        records = run_training(tmp_root / f"run{index}", [*short, *overrides], nproc, timeout)
        run_rates = step_rates(records, warmup)
        pooled[name].extend(run_rates)
        print(f"  run {index + 1}/{len(order)} {name:28s} {statistics.median(run_rates):8,.0f} tokens/s", flush=True)
    rates = {name: statistics.median(values) for name, values in pooled.items()}
    for name, rate in rates.items():
        print(f"  {name:28s} {rate:8,.0f} tokens/s (median of {len(pooled[name])} steps)")
    print(f"(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"\ndemo, global batch {cfg.train.global_batch}, micro-batch {cfg.train.micro_batch}, fp32, ZeRO-1:")
    dp2 = rates["DP=2"]
    for name in ("PP=2 fixed", "PP=2 dynamic", f"PP=2 fixed, micro-batch {half}"):
        micro = half if "micro-batch" in name else cfg.train.micro_batch
        m = cfg.train.global_batch // micro
        bubble = 1 / (m + 1)
        efficiency = rates[name] / (2 * rates["1 process"])
        print(f"  {name:28s} {rates[name] / dp2:.2f} x DP=2 (goal >= 0.8); {m} micro-batches: 1F1B bubble "
              f"(P-1)/(M+P-1) = {bubble:.0%}; efficiency vs 2 x one process {efficiency:.2f}")
    print(f"  DP=2 efficiency vs 2 x one process {dp2 / (2 * rates['1 process']):.2f}")
    shutil.rmtree(tmp_root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="steps per training run")
    parser.add_argument("--warmup", type=int, default=2, help="steps of each run left out of the median")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each configuration, in mirrored order")
    parser.add_argument("--plans", type=int, default=2000, help="sampled plans per boundary for the byte counts")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--skip-training", action="store_true", help="byte counts only")
    args = parser.parse_args(argv)
    if args.warmup < 0 or args.steps <= args.warmup or args.repeats < 1:
        parser.error("--steps must exceed --warmup (>= 0) and --repeats be >= 1: no step would be measured")
    os.environ.update(ENV)
    bytes_section(args.plans)
    if not args.skip_training:
        training_section(args.steps, args.warmup, args.repeats, args.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
