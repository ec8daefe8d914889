"""megakv-merge: concatenate `.bin/.idx` pairs into one, streaming (flat memory).

    megakv-merge --inputs PREFIX... --output-prefix OUT [--overwrite]

Inputs may be globs (`out/part_*`); they are merged in the given (globs: sorted) order, and the result is
byte-identical to preprocessing all their inputs at once in that order. QA samples (megakv-qa prep) keep
their loss masks: OUT_lossmask is merged alongside; mixing masked and unmasked inputs is refused.
"""

from __future__ import annotations

import argparse

from megakv.cli.progress import ProgressBar
from megakv.data.cli_support import run_cli
from megakv.data.merge import merge


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="megakv-merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="prefixes or globs of pairs to merge")
    p.add_argument("--output-prefix", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing pair at the output")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    def run() -> None:
        with ProgressBar(None, "merging", "B", enabled=not args.no_progress, unit_scale=True) as bar:
            meta = merge(args.inputs, args.output_prefix, overwrite=args.overwrite, progress=bar.show)
        masks = f", loss masks merged ({meta['sft']['seq_len']}-token QA samples)" if meta.get("sft") else ""
        print(f"{args.output_prefix}: merged {meta['merged_count']} pairs, {meta['documents']:,} documents, "
              f"{meta['tokens']:,} tokens ({meta['dtype']}){masks} in {meta['seconds']:.1f} s", flush=True)

    return run_cli(run)


if __name__ == "__main__":
    raise SystemExit(main())
