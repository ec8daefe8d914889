"""Many `.bin/.idx` pairs -> one, by streaming (no index is ever held in memory whole).

The result is byte-identical to preprocessing all the inputs at once in the same order. QA samples
prepared by `megakv-qa prep` carry a loss-mask pair (`PREFIX_lossmask`): when every input has one, the
masks are merged the same way (committed just before the token pair's `.idx` lands), so the merged
data still counts only what each input counted; a mix of masked and unmasked inputs is refused.
"""

from __future__ import annotations

import glob
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from megakv.data.errors import DataError
from megakv.data.indexed import (
    MASK_SUFFIX,
    IndexedDataset,
    IndexedWriter,
    bin_path,
    idx_path,
    mask_prefix,
    pair_exists,
    remove_pair,
)
from megakv.data.metadata import meta_path, read_meta, write_meta
from megakv.data.output_lock import output_lock
from megakv.data.tokenizer import TokenizerInfo, save_beside_data


def merged_sft_meta(prefixes: list[Path], metas: list[dict | None]) -> dict | None:
    """The `sft` metadata of the merged QA samples (None: no input has a loss mask); refuses a mix."""
    masked = [pair_exists(mask_prefix(p)) for p in prefixes]
    if not any(masked):
        return None
    if not all(masked):
        plain = [str(p) for p, m in zip(prefixes, masked) if not m][:3]
        raise DataError(f"some inputs are QA samples with a loss mask (megakv-qa prep) and some are not "
                        f"(no {MASK_SUFFIX} pair: {plain})", "merge masked QA samples only with each other")
    sft = [((m or {}).get("sft") or {}) for m in metas]
    lengths = {s.get("seq_len") for s in sft}
    if len(lengths) != 1 or None in lengths:
        raise DataError(f"the QA inputs were prepared with different --seq-len {sorted(map(str, lengths))}",
                        "prepare them with one --seq-len (megakv-qa prep), then merge")
    orders: Counter = Counter()
    for s in sft:
        orders.update(s.get("orders", {}))
    return {"seq_len": lengths.pop(), "orders": dict(orders), "pad_id": sft[0].get("pad_id"),
            "answer_tokens": sum(int(s.get("answer_tokens", 0)) for s in sft),
            "source": [str(s.get("source")) for s in sft][:100]}


def check_shards(prefixes: list[Path], metas: list[dict | None]) -> None:
    """Parts of a SLURM array run (their metadata records `shard: [i, n]`) must be all n shares of one run,
    once each. A glob `part_*` also matched the stale parts of an earlier run with another shard count
    (or a share prepared twice), and the merge duplicated or mixed their documents. Checked per directory:
    complete runs in different directories may be merged together."""
    runs: dict[Path, list[tuple[Path, int, int]]] = {}
    for prefix, meta in zip(prefixes, metas):
        shard = (meta or {}).get("shard")
        if shard:
            runs.setdefault(prefix.parent.resolve(), []).append((prefix, int(shard[0]), int(shard[1])))
    for parts in runs.values():
        _check_one_run(parts)


def _check_one_run(parts: list[tuple[Path, int, int]]) -> None:
    counts = {n for _, _, n in parts}
    if len(counts) > 1:  # the newest part tells the current run from the stale one
        newest = max(parts, key=lambda part: meta_path(part[0]).stat().st_mtime)[2]
        stray = [str(p) for p, _, n in parts if n != newest]
        raise DataError(f"the parts come from array runs with different --num-shards {sorted(counts)}: "
                        f"{len(stray)} part(s) record another shard count than the newest run's {newest} "
                        f"({_names(stray)})", "delete the stale parts of the earlier run (or pass only the "
                        f"current run's {newest} parts), then merge again")
    (count,) = counts
    seen: dict[int, list[str]] = {}
    for prefix, index, _ in parts:
        seen.setdefault(index, []).append(str(prefix))
    twice = [" and ".join(names) for names in seen.values() if len(names) > 1]
    if twice:
        raise DataError(f"the same share of the array run was prepared more than once: {'; '.join(twice)}",
                        "keep one part per shard index (delete the copies), then merge again")
    missing = [str(index) for index in range(count) if index not in seen]
    if missing:
        raise DataError(f"the parts in {parts[0][0].parent} record shares {_names([str(i) for i in sorted(seen)])} "
                        f"of an array run of {count}: missing {_names(missing)}",
                        f"run the missing array tasks (NUM_SHARDS={count} sbatch --array={','.join(missing)} "
                        "data_prep/preprocess_array.sbatch), then merge again")


def _names(items: list[str], shown: int = 5) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def expand_prefixes(patterns: list[str]) -> list[Path]:
    """Prefixes from prefixes or globs (a glob matches `.idx` files: `out/part_*` or `out/part_*.idx`)."""
    prefixes: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            base = pattern[:-4] if pattern.endswith(".idx") else pattern
            matches = sorted(glob.glob(base + ".idx") + ([] if base.endswith("*") else glob.glob(base + "*.idx")))
            matches = sorted(set(matches))
            # `out/part_*` also matches QA parts' loss-mask pairs: those travel with their token pair.
            found = {m[:-4] for m in matches}
            matches = [m for m in matches if not (m[:-4].endswith(MASK_SUFFIX) and
                                                  m[:-4].removesuffix(MASK_SUFFIX) in found)]
            if not matches:
                raise DataError(f"{pattern!r} matched no .idx files", "check the pattern and quoting")
            prefixes.extend(Path(m[:-4]) for m in matches)
        else:
            prefixes.append(Path(pattern[:-4] if pattern.endswith((".idx", ".bin")) else pattern))
    return prefixes


def merge(inputs: list[str], output_prefix: str | Path, *, overwrite: bool = False,
          progress: Callable[[int, int], None] | None = None) -> dict:
    """Concatenate the pairs `inputs` (prefixes or globs, in order) into `output_prefix`; returns its metadata.
    `progress(done, total)`: bytes read so far of all the work (each .bin is scanned once, then copied).

    Holds the output's lock (output_lock.py): two merges into one prefix both reported success while the
    output held only the last one's documents; the second is refused instead."""
    prefixes = expand_prefixes(inputs)
    output = Path(output_prefix)
    if not prefixes:
        raise DataError("nothing to merge", "pass --inputs PREFIX...")
    if output in prefixes:
        raise DataError(f"the output {output} is also an input", "choose another --output-prefix")
    with output_lock(output, "megakv-merge"):
        return _merge(prefixes, output, overwrite, progress)


def _merge(prefixes: list[Path], output: Path, overwrite: bool, progress: Callable[[int, int], None] | None
           ) -> dict:
    started = time.time()
    if pair_exists(output) and not overwrite:
        raise DataError(f"{idx_path(output)} already exists", "choose another --output-prefix or pass --overwrite")

    sources = [IndexedDataset(p) for p in prefixes]  # validates every pair before writing anything
    if not sum(len(s) for s in sources):  # like megakv-prep: an output without documents is no dataset
        raise DataError(f"the {len(sources)} input pair(s) hold no documents", "merge pairs that hold data")
    metas = [read_meta(p) for p in prefixes]
    check_shards(prefixes, metas)
    dtypes = {str(s.dtype) for s in sources}
    if len(dtypes) > 1:
        raise DataError(f"the inputs store different token dtypes {sorted(dtypes)}",
                        "merge only pairs made with the same tokenizer")
    # Megatron-made pairs, or a merge without a tokenizer beside its inputs, record none.
    fingerprints = {((m or {}).get("tokenizer") or {}).get("fingerprint") for m in metas} - {None}
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
    total, done = 2 * sum(s.bin_nbytes for s in sources), 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        if progress is not None:
            progress(done, total)

    scanned = []
    for source in sources:
        scanned.append(source.max_token_id())
        advance(source.bin_nbytes)
    for prefix, meta_of, largest in zip(prefixes, metas, scanned):
        claimed = (meta_of or {}).get("max_token_id")
        if claimed is not None and largest > int(claimed):
            raise DataError(f"{bin_path(prefix)} holds token id {largest}, above the max_token_id {claimed} its "
                            ".meta.json claims (the .bin was changed after preparation, or the metadata is wrong)",
                            "re-prepare that input with megakv-prep, then merge again")
    sft = merged_sft_meta(prefixes, metas)

    def commit_mask_and_meta() -> None:
        # Runs once the old output's .idx is gone: no moment pairs a new mask with old tokens, or the reverse.
        if sft is not None:
            with IndexedWriter(mask_prefix(output), "uint8") as masks:
                for prefix in prefixes:
                    masks.add_index(IndexedDataset(mask_prefix(prefix)))
                masks.finalize()
        else:
            remove_pair(mask_prefix(output))  # a stale mask from an overwritten QA output must not apply
        write_meta(output, meta)

    with IndexedWriter(output, sources[0].dtype) as writer:
        for source in sources:
            writer.add_index(source)
            advance(source.bin_nbytes)
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
        if sft is not None:
            meta["sft"] = sft
        writer.finalize(before_commit=commit_mask_and_meta)
    return meta
