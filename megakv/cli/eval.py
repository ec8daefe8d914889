r"""megakv-eval: validation loss / perplexity of one model at several KV retention plans.

  megakv-eval --model DIR --data data/val_text_document --retain every:1 every:2 every:3 every:4 \
      --json eval.json --plot eval.png
  megakv-eval --model DIR --data held_out.txt --retain all 0,3,5
  megakv-eval --model RCLA_DIR --baseline NORMAL_DIR --data ...   (both models side by side)

Every plan is scored on the same token windows. `--data` is a `.bin/.idx` prefix, or a jsonl / parquet /
text file read as megakv-prep reads it (encoded with the model's tokenizer, or --tokenizer DIR). Only the
first --max-tokens tokens are scored (0 scores everything); the output says how many of how many.
"""

from __future__ import annotations

import argparse
import sys

from megakv.cli.eval_qa import add_qa_arguments, run_qa
from megakv.config.validation import ValidationConfig
from megakv.data.preprocess import PrepOptions
from megakv.data.sft import QA_SEQ_LEN
from megakv.eval.loss import BATCH_SIZE
from megakv.inference.cli_support import (
    DTYPES,
    add_model_arguments,
    apply_runtime_options,
    check_output_file,
    given_options,
    plot_suffixes,
    run_cli,
)


def add_data_arguments(parser: argparse.ArgumentParser, qa: bool = False) -> None:
    parser.add_argument("--data", required=True,
                        help=".bin/.idx prefix, or a jsonl / parquet / text file (optionally .gz) of held-out data")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory for raw data (default: the model's)")
    parser.add_argument("--text-key", default=PrepOptions().text_key,
                        help="jsonl / parquet field holding the text (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=65536,
                        help="score only the first this many tokens of the data; 0 scores all (default: %(default)s)")
    qa_help = (f"; --task qa: the sample length the prompts are cut for (default {QA_SEQ_LEN}, megakv-qa prep's; "
               "pass the --seq-len the records were prepared with; at most the model's max_seq_len)") if qa else ""
    parser.add_argument("--seq-len", type=int, default=None,
                        help=f"window length (default: the model's max_seq_len){qa_help}")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                        help="windows per forward pass (default: %(default)s)")
    parser.add_argument("--cache-dtype", choices=sorted(DTYPES), default=None,
                        help="dtype in which KV bytes per token are counted (default: --dtype, the dtype megakv's "
                             "engine stores the cache in; name another to plan for a server that stores it so)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def cache_dtype_name(args: argparse.Namespace) -> str:
    """The dtype KV bytes are counted in: --cache-dtype, else the model's --dtype (what the engine allocates)."""
    return args.cache_dtype or args.dtype


def load_windows(args: argparse.Namespace, model, tokenizer_dir):
    """(windows, a line saying how many tokens of how many are scored); warns about a long --seq-len."""
    from megakv.eval.data import make_windows, read_eval_tokens

    if args.seq_len is not None and args.seq_len < 1:
        raise ValueError(f"--seq-len must be >= 1 (or left out for the model's context), got {args.seq_len}")
    if args.max_tokens != 0 and args.max_tokens < 2:
        raise ValueError(f"--max-tokens must be >= 2 (or 0 for all), got {args.max_tokens}")
    seq_len = args.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        print(f"warning: --seq-len {seq_len} exceeds the model's context of {model.cfg.max_seq_len} tokens "
              f"(max_seq_len): positions beyond it were never trained and the loss will be worse",
              file=sys.stderr)
    if args.tokenizer and tokenizer_dir is not None:
        from megakv.data.tokenizer import encode_alike

        if encode_alike(args.tokenizer, tokenizer_dir) is False:  # the loss of other ids would mean nothing
            raise ValueError(f"--tokenizer {args.tokenizer} gives other token ids than the model's tokenizer "
                             f"({tokenizer_dir}): drop --tokenizer, the model's is used")
    loaded = read_eval_tokens(args.data, args.tokenizer or tokenizer_dir, args.max_tokens or None, args.text_key,
                              model.cfg.eos_token_ids)
    windows = make_windows(loaded.tokens, seq_len, model.cfg.vocab_size)
    scored = len(windows) * (windows.shape[1] - 1)
    hint = f"; --max-tokens {args.max_tokens} (0 scores all)" if loaded.truncated else ""
    return windows, f"{loaded.describe(scored)} in {len(windows)} windows of {windows.shape[1] - 1}{hint}"


def load_baseline(args: argparse.Namespace, model):
    """The --baseline model; it must read the same windows (same vocabulary, context and depth)."""
    from megakv.model_paths import resolve_model

    baseline, _ = resolve_model(args.baseline, args.device, DTYPES[args.dtype])
    for field in ("vocab_size", "max_seq_len", "n_layers"):
        ours, theirs = getattr(model.cfg, field), getattr(baseline.cfg, field)
        if ours != theirs:
            raise ValueError(f"--baseline {args.baseline} has {field}={theirs} but --model {args.model} has "
                             f"{ours}: compare models of the same shape and tokenizer")
    return baseline


# Options each task reads alone; given to the other task they are refused, not silently ignored.
LM_ONLY_OPTIONS = {"baseline": "run --task qa once per model and compare the tables (or --json)",
                   "plot": "drop it; --json writes the QA scores",
                   "max_tokens": "drop it; --limit chooses how many QA records are scored",
                   "batch_size": "drop it; QA answers one record at a time",
                   "text_key": "drop it; QA records are jsonl with context / question / answer fields",
                   "cache_dtype": "drop it; the QA table reports no cache bytes"}
QA_ONLY_OPTIONS = ("max_new_tokens", "order", "limit", "spread")


def refuse_other_task_options(args: argparse.Namespace) -> None:
    given = args.given_options
    if args.task == "qa":
        for dest, fix in LM_ONLY_OPTIONS.items():
            if dest in given:
                raise ValueError(f"{option_flag(dest)} applies to --task lm (held-out loss) only, not to --task qa. "
                                 f"Fix: {fix}")
    else:
        for dest in QA_ONLY_OPTIONS:
            if dest in given:
                raise ValueError(f"{option_flag(dest)} applies to --task qa only, not to the held-out loss "
                                 f"(--task lm). Fix: add --task qa with a QA jsonl as --data, or drop it")


def option_flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megakv-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    add_data_arguments(parser, qa=True)
    plans = ValidationConfig().plans
    parser.add_argument("--retain", nargs="+", default=plans,
                        help=f"retention plans: all, every:K, or layer lists like 0,3,5 (default: {' '.join(plans)})")
    parser.add_argument("--baseline", default=None,
                        help="a second model (e.g. trained normally) scored on the same windows and plans, "
                             "printed beside --model with each one's loss relative to its own full cache")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--plot", default=None, help="write a PNG plot of loss against KV cache bytes here")
    parser.add_argument("--task", choices=("lm", "qa"), default="lm",
                        help="lm: loss on text; qa: answers to QA records, EM/F1 (megakv/cli/eval_qa.py)")
    add_qa_arguments(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    from megakv.cli.progress import ProgressBar
    from megakv.eval.loss import evaluate_plans
    from megakv.eval.report import format_comparison, format_table, plot_loss_vs_retention, write_json
    from megakv.inference.engine import resolve_plan
    from megakv.model_paths import resolve_model

    apply_runtime_options(args)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_output_file(args.json, "--json")
    if args.task == "lm":
        check_output_file(args.plot, "--plot", plot_suffixes())
    refuse_other_task_options(args)
    if args.task == "qa":
        return run_qa(args)
    model, tokenizer_dir = resolve_model(args.model, args.device, DTYPES[args.dtype])
    for spec in args.retain:  # reject a bad plan before spending time on the others
        resolve_plan(spec, model.cfg.n_layers)
    baseline = load_baseline(args, model) if args.baseline else None
    windows, scored = load_windows(args, model, tokenizer_dir)
    models = [model] if baseline is None else [model, baseline]
    with ProgressBar(len(models) * len(args.retain) * len(windows), "evaluating", "windows",
                     not args.no_progress) as bar:
        scored_models = [evaluate_plans(m, args.retain, windows, args.batch_size, DTYPES[cache_dtype_name(args)],
                                        progress=bar.advance) for m in models]
    results = scored_models[0]
    print(f"model {args.model} ({model.cfg.n_layers} layers), data {args.data}: {scored}")
    print(format_table(results, cache_dtype_name(args)))
    extra = {}
    if baseline is not None:
        print("\nside by side: loss (and its ratio to the same model's first plan)")
        print(format_comparison({str(args.model): results, str(args.baseline): scored_models[1]}))
        extra = {"baseline": str(args.baseline), "baseline_results": [r.to_dict() for r in scored_models[1]]}
    if args.json:
        path = write_json(results, args.json, model=str(args.model), data=str(args.data),
                          n_layers=model.cfg.n_layers, windows=len(windows), seq_len=windows.shape[1] - 1, **extra)
        print(f"wrote {path}")
    if args.plot:
        print(f"wrote {plot_loss_vs_retention(results, args.plot, title=f'{args.model}')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.given_options = given_options(parser, argv)
    return run_cli("megakv-eval", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
