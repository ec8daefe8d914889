"""`PREFIX.meta.json`, written beside each pair by megakv-prep / megakv-merge, and dataset identities.

The metadata records what the pair holds (documents, tokens, dtype, largest token id), the tokenizer it
was made with (a fingerprint; the tokenizer itself lives in `tokenizer/` of the same directory), what
went in (an input fingerprint, so re-running the same job is a no-op and a different job is refused) and
what was skipped. Pairs made by Megatron or GPT-NeoX have no metadata and still load.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from megakv.data.errors import DataError
from megakv.data.indexed import IndexedDataset, bin_path, idx_path, mask_prefix, pair_exists, temporary_tag
from megakv.json_input import TOO_DEEP, parse_json

META_SUFFIX = ".meta.json"
FORMAT = "megakv-indexed-v1"


def meta_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}{META_SUFFIX}")


def write_meta(prefix: str | Path, meta: dict) -> None:
    path = meta_path(prefix)
    tmp = path.with_name(path.name + temporary_tag())
    try:
        tmp.write_text(json.dumps({"format": FORMAT, **meta}, indent=2, sort_keys=False) + "\n")
        tmp.replace(path)
    finally:  # a failed write (full disk) leaves no temporary behind
        tmp.unlink(missing_ok=True)


def read_meta(prefix: str | Path) -> dict | None:
    path = meta_path(prefix)
    if not path.exists():
        return None
    try:
        meta = parse_json(path.read_text())
    except ValueError as e:
        problem = f"holds {TOO_DEEP}" if str(e) == TOO_DEEP else f"is not valid JSON ({e})"
        raise DataError(f"{path} {problem}", "re-create the dataset or delete the file") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} holds a JSON {type(meta).__name__}, not megakv's metadata object",
                        "re-create the dataset or delete the file")
    if meta.get("format") != FORMAT:
        raise DataError(f"{path} has unknown format {meta.get('format')!r}", "re-create the dataset")
    return meta


def _sampled_digest(path: Path, digest, samples: int = 16, chunk: int = 1 << 18) -> None:
    """Hash a file whole if small, else `samples` evenly spaced chunks (cheap on multi-GB files)."""
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "little"))
    with open(path, "rb") as f:
        if size <= samples * chunk:
            digest.update(f.read())
            return
        for i in range(samples):
            f.seek((size - chunk) * i // (samples - 1))
            digest.update(f.read(chunk))


def dataset_identity(prefix: str | Path) -> str:
    """A short hash that changes when the pair's content changes (for cache names and fingerprints).

    The `.idx` (document lengths) is hashed whole up to 256 MiB, the `.bin` is sampled: a different
    tokenizer or different documents change the lengths, so this catches every realistic change.
    """
    digest = hashlib.sha256(b"megakv-dataset-identity-v1\0")
    ipath = idx_path(prefix)
    if ipath.stat().st_size <= 256 << 20:
        digest.update(ipath.read_bytes())
    else:
        _sampled_digest(ipath, digest, samples=256, chunk=1 << 20)
    _sampled_digest(bin_path(prefix), digest)
    return digest.hexdigest()[:24]


def token_id_bound(dataset: IndexedDataset, meta: dict | None) -> int:
    """Largest token id in the pair: from the metadata when present, else by scanning `.bin`."""
    if meta is not None and "max_token_id" in meta:
        return int(meta["max_token_id"])
    return dataset.max_token_id()


def header_summary(dataset: IndexedDataset) -> dict:
    return {"sequences": len(dataset), "documents": dataset.num_documents, "tokens": dataset.num_tokens,
            "dtype": np.dtype(dataset.dtype).name}


def loss_mask_identity(prefix: str | Path) -> str | None:
    """The identity of the loss mask prepared beside a pair (QA records), None when it has none: the tokens
    of `megakv-qa prep --loss-on answer` and `--loss-on record` are the same, only their masks differ."""
    masks = mask_prefix(prefix)
    return dataset_identity(masks) if pair_exists(masks) else None


def loss_masks_fingerprint(prefixes: list[str | Path]) -> str:
    """The training sets' loss masks in order ("" when none has one)."""
    masks = [loss_mask_identity(prefix) for prefix in prefixes]
    return hashlib.sha256(json.dumps(masks).encode()).hexdigest()[:20] if any(masks) else ""


def loss_mask_change(saved: str, current: str) -> str | None:
    """What is wrong when a checkpoint's loss masks (`saved`; "" from before they were recorded) are not the
    data's (`current`), else None."""
    if not saved or saved == current:
        return None
    return (f"the checkpoint was trained with other loss masks (fingerprint {saved}, this data's "
            f"{current or 'none'}): a dataset's QA records were prepared again with other masks "
            "(megakv-qa prep --loss-on)")
