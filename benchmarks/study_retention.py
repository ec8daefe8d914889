"""R-CLA vs normal training under KV sharing across depth: the paper's central claim, measured side by side.

Trains the same small model twice on the same data and steps with `megakv-train` (one process): once with
routing `none` (normal training) and once with `rcla` (q_cross), then scores both on held-out data at
retention every:1..4 and prints each loss and its ratio to the same model's full-cache loss. Expected: the
normally trained model degrades much more when layers share caches than the R-CLA model does.

  megakv-data demo --output data/shakespeare          # once
  python benchmarks/study_retention.py [--steps 300] [--q-cross 0.5] [--out runs/study]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from megakv.eval.data import load_eval_tokens, make_windows
from megakv.eval.loss import evaluate_plans
from megakv.model_paths import resolve_model
from megakv.study.runs import train_run

REPO = Path(__file__).resolve().parents[1]
RETAIN = ["every:1", "every:2", "every:3", "every:4"]


def train(run_dir: Path, data: Path, strategy: str, q_cross: float, steps: int, model: list[str]) -> None:
    """megakv-train, or the finished run already there when it was trained with these settings (resumed when
    it was interrupted; refused, naming the difference, when it was trained with others)."""
    overrides = [f"train.steps={steps}", f"routing.strategy={strategy}", f"routing.q_cross={q_cross}",
                 f"data.datasets=[{data}/shakespeare_train]", f"data.valid_datasets=[{data}/shakespeare_valid]",
                 f"data.tokenizer={data}/tokenizer", "validation.every=0", f"checkpoint.every={steps}",
                 "optim.warmup_steps=10", *model]
    train_run(REPO / "megakv" / "recipes" / "demo.yaml", run_dir, overrides, log=print)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "shakespeare")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "study_retention")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--q-cross", type=float, default=0.5)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--model", nargs="*", default=["model.n_layers=8", "model.d_model=128", "model.n_heads=4",
                                                        "model.n_kv_heads=4", "model.ffn_hidden=352",
                                                        "model.max_seq_len=128"],
                        help="model overrides (default: 8 layers, d=128, seq 128)")
    args = parser.parse_args()
    if not (args.data / "shakespeare_train.idx").is_file():
        print(f"error: no prepared data in {args.data}. Fix: run `megakv-data demo --output {args.data}` first",
              file=sys.stderr)
        sys.exit(2)

    torch.set_num_threads(1)
    results = {}
    for name, strategy in (("normal", "none"), (f"rcla q={args.q_cross}", "rcla")):
        run_dir = args.out / strategy
        start = time.perf_counter()
        try:
            train(run_dir, args.data, strategy, args.q_cross, args.steps, args.model)
        except ValueError as e:  # the directory holds a run trained with other settings
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        model, _ = resolve_model(run_dir)
        tokens = load_eval_tokens(args.data / "shakespeare_valid", max_tokens=args.eval_tokens)
        windows = make_windows(tokens, model.cfg.max_seq_len, model.cfg.vocab_size)
        with torch.no_grad():
            results[name] = {r.retain: r.loss for r in evaluate_plans(model, RETAIN, windows)}
        print(f"{name}: trained and evaluated in {time.perf_counter() - start:.0f} s", flush=True)

    print(f"\nheld-out loss ({args.eval_tokens} tokens), {args.steps} steps, {' '.join(args.model)}")
    print(f"{'retain':10}" + "".join(f"{name:>16}{'ratio':>8}" for name in results))
    for spec in RETAIN:
        row = f"{spec:10}"
        for losses in results.values():
            row += f"{losses[spec]:16.4f}{losses[spec] / losses['every:1']:8.3f}"
        print(row)


if __name__ == "__main__":
    main()
