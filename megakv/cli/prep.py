"""megakv-prep: tokenize jsonl / txt / parquet (optionally .gz) into one Megatron `.bin/.idx` pair.

    megakv-prep --input PATH... --tokenizer DIR --output-prefix PREFIX [--workers N] [--text-key text]

Writes PREFIX.bin, PREFIX.idx, PREFIX.meta.json and the tokenizer as tokenizer/ beside them. Bad records
(invalid UTF-8, empty text, missing field, non-JSON line) are skipped and counted, or with --strict stop
the job naming file and line. An empty output, or one that skipped more than --max-skip-fraction of
its records, is an error (exit 2) naming the top reason. For a SLURM array, --shard-index/--num-shards
pick this task's files.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from megakv.data.cli_support import run_cli
from megakv.data.preprocess import DEFAULT_MAX_SKIP_FRACTION, PrepOptions, preprocess
from megakv.data.sources import FORMATS, TXT_UNITS


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megakv-prep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="files, globs or directories")
    p.add_argument("--tokenizer", required=True, help="megakv tokenizer directory, or a Hugging Face one")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin / PREFIX.idx")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    defaults = PrepOptions()
    p.add_argument("--text-key", default=defaults.text_key,
                   help="jsonl / parquet field holding the text (default: %(default)s)")
    p.add_argument("--format", choices=FORMATS, help="input format (default: from file names)")
    p.add_argument("--txt-unit", choices=TXT_UNITS, default=defaults.txt_unit,
                   help="what one document of a .txt file is (default: the whole file)")
    p.add_argument("--prepend-bos", action="store_true", help="also start every document with BOS")
    p.add_argument("--eos-token", help="end-of-document token for a Hugging Face tokenizer that has none")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record (file:line)")
    p.add_argument("--max-skip-fraction", type=float, default=DEFAULT_MAX_SKIP_FRACTION,
                   help="fail (writing no .bin/.idx) when more than this fraction of the records is skipped; an "
                        "output without documents always fails (default: %(default)s)")
    p.add_argument("--max-record-mb", type=float, default=defaults.max_record_mb,
                   help="skip (or, with --strict, fail on) a record larger than this: tokenizing one record takes "
                        "about 60x its size in memory (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what PREFIX holds, also the output of this very job (prepared again)")
    p.add_argument("--shard-index", type=int, help="keep only this shard of the input files (0-based)")
    p.add_argument("--num-shards", type=int, help="number of shards the input files are split into")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if (args.shard_index is None) != (args.num_shards is None):
        parser.error("--shard-index and --num-shards go together")
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.output_prefix.endswith(("/", os.sep)):  # `out/` wrote ./out.bin beside the directory
        parser.error(f"--output-prefix {args.output_prefix} names a directory: give a file prefix inside it, e.g. "
                     f"{Path(args.output_prefix) / 'train'}")
    options = PrepOptions(text_key=args.text_key, txt_unit=args.txt_unit, format=args.format,
                          prepend_bos=args.prepend_bos, strict=args.strict, max_record_mb=args.max_record_mb)
    shard = (args.shard_index, args.num_shards) if args.num_shards is not None else None

    def run() -> None:
        summary = preprocess(args.input, args.tokenizer, args.output_prefix, workers=args.workers,
                             options=options, shard=shard, overwrite=args.overwrite, redo=args.overwrite,
                             eos_token=args.eos_token,
                             progress=not args.no_progress,
                             max_skip_fraction=args.max_skip_fraction)
        print(summary.format(), flush=True)
        if warning := summary.stale_reader_warning():
            print(warning, file=sys.stderr, flush=True)

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
