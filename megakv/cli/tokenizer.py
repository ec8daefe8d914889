"""megakv-tokenizer: train a SentencePiece tokenizer, import a Hugging Face one, or show one.

    megakv-tokenizer train --input PATH... --vocab-size N --output DIR
    megakv-tokenizer import --from HF_DIR --output DIR [--eos-token TOKEN]
    megakv-tokenizer info DIR
    megakv-tokenizer encode DIR "some text"
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from megakv.data.cli_support import refuse_output_dir, run_cli
from megakv.data.documents import iter_texts, unpaired_surrogate
from megakv.data.errors import DataError
from megakv.data.preprocess import PrepOptions
from megakv.data.sources import FORMATS, TXT_UNITS, describe_ignored, expand_inputs
from megakv.data.tokenizer import (
    METADATA_FILE,
    SPM_CHARACTER_COVERAGE,
    SPM_MAX_SENTENCE_BYTES,
    SPM_MAX_SENTENCES,
    SPM_MODEL_TYPES,
    check_spm_settings,
    import_hf_tokenizer,
    load_tokenizer,
    train_sentencepiece,
    verified_info,
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megakv-tokenizer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a SentencePiece tokenizer on local text")
    train.add_argument("--input", nargs="+", required=True, help="files, globs or directories")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--output", required=True, help="tokenizer directory to write")
    train.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    train.add_argument("--model-type", choices=SPM_MODEL_TYPES, default=SPM_MODEL_TYPES[0],
                       help="(default: %(default)s)")
    text = PrepOptions()
    train.add_argument("--text-key", default=text.text_key,
                       help="jsonl / parquet field holding the text (default: %(default)s)")
    train.add_argument("--format", choices=FORMATS, help="input format (default: from file names)")
    train.add_argument("--txt-unit", choices=TXT_UNITS, default=text.txt_unit,
                       help="what one document of a .txt file is (default: %(default)s)")
    train.add_argument("--character-coverage", type=float, default=SPM_CHARACTER_COVERAGE,
                       help="fraction of characters covered by pieces of their own; rarer ones fall back to "
                            "bytes. Lower it (e.g. 0.995) when a small --vocab-size is refused (default: "
                            "%(default)s)")
    train.add_argument("--max-sentences", type=int, default=SPM_MAX_SENTENCES,
                       help="lines sampled for training (bounds memory and time; default: %(default)s)")
    imp = sub.add_parser("import", help="save a Hugging Face tokenizer directory as a megakv one")
    imp.add_argument("--from", dest="source", required=True, help="directory AutoTokenizer loads offline")
    imp.add_argument("--output", required=True)
    imp.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    imp.add_argument("--eos-token", help="end-of-document token, if the tokenizer declares none")
    info = sub.add_parser("info", help="check that a tokenizer directory loads and matches its metadata, "
                                        "and print the metadata")
    info.add_argument("directory")
    enc = sub.add_parser("encode", help="print the ids of a text (a quick check)")
    enc.add_argument("directory")
    enc.add_argument("text")
    return parser


def _utf8_argument(text: str) -> str:
    """The text to encode; bytes that are not UTF-8 reach Python as lone surrogates, which no tokenizer takes."""
    at = unpaired_surrogate(text)
    if at is not None:
        raise DataError(f"the text argument {text!r} is not valid UTF-8 (character {at} is an undecodable byte)",
                        "pass the text in UTF-8 (check the terminal's encoding: LANG / LC_ALL)")
    return text


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def run() -> None:
        if args.command == "train":
            check_spm_settings(args.vocab_size, args.model_type, args.max_sentences, args.character_coverage)
            skipped: Counter = Counter()
            ignored: dict = {}
            files = expand_inputs(args.input, args.format, ignored)
            refuse_output_dir(args.output, [*(f.path for f in files), *args.input], args.overwrite)
            read, stats = Counter(), Counter()

            def counted_texts():
                for text in iter_texts(files, args.text_key, args.txt_unit, skipped):
                    read["texts"] += 1
                    yield text

            try:
                info = train_sentencepiece(counted_texts(), args.output, args.vocab_size, model_type=args.model_type,
                                           max_sentences=args.max_sentences,
                                           character_coverage=args.character_coverage, stats=stats)
            except DataError:
                if read["texts"] == 0:  # SentencePiece's own message would blame the vocabulary size
                    raise DataError(f"no text was read from the {len(files)} input file(s) (skipped records: "
                                    f"{dict(skipped) or 'none'})", f"check --text-key (now {args.text_key!r}), "
                                    "--format and --txt-unit") from None
                raise
            print(f"trained {info.kind} {args.model_type} tokenizer, vocab {info.vocab_size}, eos {info.eos_id} "
                  f"-> {args.output}" + (f" (skipped records: {dict(skipped)})" if skipped else ""))
            if stats["split_lines"]:  # SentencePiece skips longer lines: they were cut up rather than lost
                print(f"{stats['split_lines']:,} lines over {SPM_MAX_SENTENCE_BYTES:,} bytes were split into "
                      "pieces for training")
            if ignored:
                print(describe_ignored(ignored))
        elif args.command == "import":
            refuse_output_dir(args.output, [args.source], args.overwrite)
            info = import_hf_tokenizer(args.source, args.output, args.eos_token)
            print(f"imported {args.source}: vocab {info.vocab_size}, eos {info.eos_id} -> {args.output}")
        elif args.command == "info":
            directory = Path(args.directory)
            if not (directory / METADATA_FILE).exists() and (directory / "tokenizer.json").is_file():
                # A transformers tokenizer (an imported model's tokenizer/): what megakv reads it as, unsaved
                print(json.dumps(asdict(load_tokenizer(directory).info), indent=2))
                print(f"{directory} is a Hugging Face tokenizer directory (no {METADATA_FILE}): megakv reads it as "
                      "above; megakv-prep saves an imported copy beside the data (`megakv-tokenizer import` "
                      "makes one)", file=sys.stderr)
            else:
                print(json.dumps(asdict(verified_info(directory)), indent=2))
        else:
            text = _utf8_argument(args.text)
            tok = load_tokenizer(args.directory)
            ids = tok.encode(text)
            print(json.dumps({"ids": ids, "decoded": tok.decode(ids)}, ensure_ascii=False))

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
