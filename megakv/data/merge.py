"""Many `.bin/.idx` pairs -> one, by streaming (no index is ever held in memory whole).

The result is byte-identical to preprocessing all the inputs at once in the same order.
"""

from __future__ import annotations

import glob
import time
from collections import Counter
from pathlib import Path

from megakv.data.errors import DataError
from megakv.data.indexed import IndexedDataset, IndexedWriter, bin_path, idx_path, pair_exists
from megakv.data.metadata import read_meta, write_meta
from megakv.data.tokenizer import TokenizerInfo, save_beside_data


def expand_prefixes(patterns: list[str]) -> list[Path]:
    """Prefixes from prefixes or globs (a glob matches `.idx` files: `out/part_*` or `out/part_*.idx`)."""
    prefixes: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            base = pattern[:-4] if pattern.endswith(".idx") else pattern
            matches = sorted(glob.glob(base + ".idx") + ([] if base.endswith("*") else glob.glob(base + "*.idx")))
            matches = sorted(set(matches))
            if not matches:
                raise DataError(f"{pattern!r} matched no .idx files", "check the pattern and quoting")
            prefixes.extend(Path(m[:-4]) for m in matches)
        else:
            prefixes.append(Path(pattern[:-4] if pattern.endswith((".idx", ".bin")) else pattern))
    return prefixes


def merge(inputs: list[str], output_prefix: str | Path, *, overwrite: bool = False) -> dict:
    """Concatenate the pairs `inputs` (prefixes or globs, in order) into `output_prefix`; returns its metadata."""
    started = time.time()
    prefixes = expand_prefixes(inputs)
    output = Path(output_prefix)
    if not prefixes:
        raise DataError("nothing to merge", "pass --inputs PREFIX...")
    if output in prefixes:
        raise DataError(f"the output {output} is also an input", "choose another --output-prefix")
    if pair_exists(output) and not overwrite:
        raise DataError(f"{idx_path(output)} already exists", "choose another --output-prefix or pass --overwrite")

    sources = [IndexedDataset(p) for p in prefixes]  # validates every pair before writing anything
    metas = [read_meta(p) for p in prefixes]
    dtypes = {str(s.dtype) for s in sources}
    if len(dtypes) > 1:
        raise DataError(f"the inputs store different token dtypes {sorted(dtypes)}",
                        "merge only pairs made with the same tokenizer")
    fingerprints = {m["tokenizer"]["fingerprint"] for m in metas if m is not None}
    if len(fingerprints) > 1:
        raise DataError("the inputs were tokenized with different tokenizers",
                        "merge only pairs made with the same tokenizer (compare their .meta.json)")
    tokenizer: TokenizerInfo | None = None
    if fingerprints:  # carry the tokenizer along (the one beside the first input that has it)
        (fingerprint,) = fingerprints
        for prefix in prefixes:
            candidate = prefix.parent / "tokenizer"
            if candidate.is_dir() and TokenizerInfo.read(candidate).fingerprint == fingerprint:
                _, tokenizer = save_beside_data(candidate, output.parent)
                break

    skipped: Counter = Counter()
    for m in metas:
        skipped.update((m or {}).get("skipped", {}))
    # The real largest id of every input (a chunked scan, cheap next to the copy): a bound its metadata
    # under-states is refused rather than carried into the merged pair's metadata.
    scanned = [s.max_token_id() for s in sources]
    for prefix, meta_of, largest in zip(prefixes, metas, scanned):
        claimed = (meta_of or {}).get("max_token_id")
        if claimed is not None and largest > int(claimed):
            raise DataError(f"{bin_path(prefix)} holds token id {largest}, above the max_token_id {claimed} its "
                            ".meta.json claims (the .bin was changed after preparation, or the metadata is wrong)",
                            "re-prepare that input with megakv-prep, then merge again")
    with IndexedWriter(output, sources[0].dtype) as writer:
        for source in sources:
            writer.add_index(source)
        meta = {
            "documents": writer.num_documents, "tokens": writer.num_tokens, "dtype": str(sources[0].dtype),
            "vocab_size": tokenizer.vocab_size if tokenizer else None,
            "eos_id": tokenizer.eos_id if tokenizer else None,
            "tokenizer": ({"dir": "tokenizer", "fingerprint": tokenizer.fingerprint} if tokenizer else None),
            "inputs_fingerprint": None,
            "merged_from": [str(p) for p in prefixes[:100]], "merged_count": len(prefixes),
            "skipped": dict(skipped), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - started, 3),
        }
        meta["max_token_id"] = max(scanned)
        writer.finalize(before_commit=lambda: write_meta(output, meta))
    return meta
