"""megakv-plan: pick the layers that keep a KV cache under a memory budget, from measured loss.

  megakv-plan --model DIR --data data/val_text_document --budget 0.5
  megakv-plan --model DIR --data held_out.txt --budget 4096B --cache-dtype bfloat16 --json plan.json

The budget is a fraction of a full cache (0.5 or 50%) or bytes per token (4096B, counted at
--cache-dtype, by default the model's --dtype, the dtype the engine stores the cache in). Every-k patterns are
scored first, then a greedy / local search over explicit sets; the answer is never worse than the best every-k
pattern on this data. Pass the printed `--retain` value to megakv-generate, megakv-eval or
`from_pretrained(..., retain=...)`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megakv.cli.eval import add_data_arguments, cache_dtype_name, load_windows
from megakv.inference.cli_support import DTYPES, add_model_arguments, apply_runtime_options, check_output_file, run_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megakv-plan", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_data_arguments(parser)
    parser.add_argument("--budget", required=True,
                        help="cache budget: a fraction (0.5), a percentage (50%%) or bytes per token (4096B)")
    parser.add_argument("--max-evaluations", type=int, default=200,
                        help="retained sets scored after the every-k patterns, at most (default: 200)")
    parser.add_argument("--json", default=None, help="write the search result as JSON here")
    return parser


def _run(args: argparse.Namespace) -> int:
    from megakv.cli.progress import ProgressBar
    from megakv.inference.cache import kv_bytes_per_token
    from megakv.model_paths import resolve_model
    from megakv.planner import most_evaluations, parse_budget, plan_with_model, retain_spec

    apply_runtime_options(args)
    check_output_file(args.json, "--json")
    model, tokenizer_dir = resolve_model(args.model, args.device, DTYPES[args.dtype])
    cache_dtype = DTYPES[cache_dtype_name(args)]
    budget = parse_budget(args.budget, model.cfg, cache_dtype)  # fail fast, before reading data
    windows, scored = load_windows(args, model, tokenizer_dir)
    # The search may stop before scoring this many sets, so the bar's ETA is an upper bound.
    total = most_evaluations(model.cfg.n_layers, budget, args.max_evaluations) * len(windows)
    with ProgressBar(total, "searching (ETA: at most)", "windows", not args.no_progress) as bar:
        result = plan_with_model(model, windows, budget, args.batch_size, args.max_evaluations, bar.advance)

    n_layers = model.cfg.n_layers

    def describe(c) -> dict:
        return {"retain": retain_spec(c.retained), "retained": list(c.retained), "found_by": c.found_by,
                "loss": c.loss, "layers": len(c.retained), "retained_fraction": len(c.retained) / n_layers,
                "kv_bytes_per_token": kv_bytes_per_token(model.cfg, len(c.retained), cache_dtype)}

    print(f"budget: {budget.description}; {scored}; {result.evaluations} sets scored")
    print("every-k patterns within budget:")
    for c in result.every_k:
        print(f"  {c.found_by:<10} layers {retain_spec(c.retained):<24} loss {c.loss:.4f}")
    best = describe(result.best)
    print(f"best: --retain {best['retain']}  ({best['layers']}/{n_layers} layers, {best['kv_bytes_per_token']} "
          f"B/token at {cache_dtype_name(args)}) loss {result.best.loss:.4f} found by {result.best.found_by}; "
          f"best every-k {result.best_every_k.found_by} loss {result.best_every_k.loss:.4f} "
          f"(improvement {result.improvement:.4f})")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({
            "model": str(args.model), "data": str(args.data), "budget": budget.description,
            "max_layers": budget.max_layers, "cache_dtype": cache_dtype_name(args), "evaluations": result.evaluations,
            "best": best, "best_every_k": describe(result.best_every_k),
            "every_k": [describe(c) for c in result.every_k], "history": [describe(c) for c in result.history],
        }, indent=2) + "\n")
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("megakv-plan", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
