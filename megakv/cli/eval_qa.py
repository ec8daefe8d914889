"""megakv-eval --task qa: greedy answers, exact match, token F1 and answer loss at every retention plan.

  megakv-eval --task qa --model DIR --data qa_test.jsonl --retain every:1 every:2 every:3 every:4 --json qa.json

`--data` is a jsonl of (context, question, answer) records (megakv-qa build writes one); prompts are
built as for fine-tuning (megakv/data/sft.py), trimmed to --seq-len tokens around each record's
`evidence` span (else around its answer: the run says how many records that was).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megakv.data.sft import ORDERS, QA_SEQ_LEN
from megakv.eval.qa import MAX_NEW_TOKENS, ORDER
from megakv.inference.cli_support import DTYPES


def add_qa_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--task qa")
    group.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                       help="longest greedy answer (default: %(default)s)")
    group.add_argument("--order", choices=sorted(ORDERS), default=ORDER,
                       help="prompt order: context first (cqa) or question first (qca) (default: %(default)s)")
    group.add_argument("--limit", type=int, default=200, help="score the first N records; 0: all "
                       "(default: %(default)s)")
    group.add_argument("--spread", action="store_true",
                       help="--limit's N records spread evenly over the file instead of its first N (a file of "
                       "several documents, as megakv-qa build's test plays, lists one after another)")


def run_qa(args: argparse.Namespace) -> int:
    from megakv.cli.progress import ProgressBar
    from megakv.data.sft import context_fits, read_qa_records
    from megakv.data.tokenizer import load_tokenizer
    from megakv.eval.qa import evaluate_qa, evenly_spaced, format_qa_table
    from megakv.inference.engine import resolve_plan
    from megakv.model_paths import resolve_model

    if args.limit < 0 or args.max_new_tokens < 1:
        raise ValueError("--limit must be >= 0 and --max-new-tokens >= 1")
    model, tokenizer_dir = resolve_model(args.model, args.device, DTYPES[args.dtype])
    plans = {spec: resolve_plan(spec, model.cfg.n_layers) for spec in args.retain}
    records = read_qa_records(args.data)
    if args.limit:
        records = evenly_spaced(records, args.limit) if args.spread else records[:args.limit]
    tokenizer_dir = args.tokenizer or tokenizer_dir
    if tokenizer_dir is None:
        raise ValueError(f"{args.model} has no tokenizer/: pass --tokenizer DIR")
    tokenizer = load_tokenizer(tokenizer_dir, model.cfg.eos_token_ids)
    seq_len = min(args.seq_len or QA_SEQ_LEN, model.cfg.max_seq_len)
    if args.seq_len and args.seq_len > seq_len:
        print(f"warning: --seq-len {args.seq_len} exceeds the model's context; QA prompts use {seq_len} tokens",
              file=sys.stderr)
    model.eval()
    with ProgressBar(len(plans) * len(records), "answering", "questions", not args.no_progress) as bar:
        results = evaluate_qa(model, tokenizer, records, plans, seq_len=seq_len, max_new_tokens=args.max_new_tokens,
                              order=args.order, progress=bar.advance)
    chosen = f"{len(records)} records" + (" spread evenly over the file" if args.spread and args.limit else "")
    print(f"model {args.model} ({model.cfg.n_layers} layers), QA data {args.data}: {chosen}, "
          f"prompts of at most {seq_len} tokens ({args.order})")
    guided = sum(not r.evidence and not context_fits(tokenizer, r, args.order, seq_len, tokenizer.info.bos_id)
                 for r in records)
    if guided:  # the scores stand, but the reference answer chose what these prompts show
        print(f"note: {guided} of {len(records)} records have a context longer than the prompt and no evidence "
              "field, so their context window is centred on the reference answer; give each record an evidence "
              "span of its context, or raise --seq-len")
    print(format_qa_table(results))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"task": "qa", "model": str(args.model), "data": str(args.data),
                                    "seq_len": seq_len, "order": args.order,
                                    "results": [r.as_dict() for r in results]}, indent=2) + "\n")
        print(f"wrote {path}")
    return 0
