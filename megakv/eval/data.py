"""Held-out tokens for evaluation: a Megatron `.bin/.idx` pair (by prefix), or raw files read as
megakv-prep reads them (jsonl / parquet records under a text key, .txt paragraphs; optionally compressed).

All become one token stream (documents concatenated in order, as prepared: the data tooling ends every
document with eos), cut into non-overlapping windows so every plan is scored on exactly the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def _indexed_prefix(data: str | Path) -> Path | None:
    text = str(data)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    prefix = Path(text)
    return prefix if Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file() else None


@dataclass(frozen=True)
class EvalTokens:
    tokens: np.ndarray
    available: int | None  # tokens the whole data holds, when known without reading all of it
    truncated: bool  # reading stopped at max_tokens

    def describe(self, scored: int) -> str:
        if self.available is not None:
            return f"scored {scored:,} of {self.available:,} tokens"
        more = " (the data holds more)" if self.truncated else ""
        return f"scored {scored:,} of {len(self.tokens):,} tokens read{more}"


def read_indexed_tokens(prefix: str | Path, max_tokens: int | None) -> np.ndarray:
    from megakv.data.indexed import IndexedDataset

    dataset = IndexedDataset(prefix)
    parts, total = [], 0
    for i in range(len(dataset)):
        remaining = None if max_tokens is None else max_tokens - total
        if remaining is not None and remaining <= 0:
            break
        part = dataset.get(i, 0, remaining)
        parts.append(part.astype(np.int64))
        total += len(part)
    return np.concatenate(parts) if parts else np.empty(0, np.int64)


def read_raw_tokens(path: str | Path, tokenizer_dir: str | Path | None, max_tokens: int | None,
                    text_key: str = "text", model_eos_ids: tuple[int, ...] = ()) -> tuple[np.ndarray, bool]:
    """(tokens, truncated) of raw files: each jsonl/parquet record or txt paragraph is a document + eos (the
    model's first, `model_eos_ids`, where the tokenizer names none)."""
    if tokenizer_dir is None:
        raise ValueError(f"{path} is raw text, but the model has no tokenizer: pass --tokenizer DIR, or "
                         f"evaluate on a prepared .bin/.idx prefix")
    from collections import Counter

    from megakv.data.documents import iter_texts
    from megakv.data.sources import expand_inputs
    from megakv.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, model_eos_ids)
    skipped: Counter = Counter()
    ids: list[int] = []
    truncated = False
    # Paragraphs of .txt become documents ended by eos, the layout the data tooling gives training documents.
    for text in iter_texts(expand_inputs([str(path)]), text_key, "paragraph", skipped):
        if max_tokens is not None and len(ids) >= max_tokens:
            truncated = True
            break
        ids.extend(tokenizer.encode(text))
        ids.append(tokenizer.eos_id)
    if not ids:
        reasons = ", ".join(f"{reason}={n}" for reason, n in skipped.most_common()) or "no records"
        raise ValueError(f"{path} holds no usable text for the text key {text_key!r} ({reasons}): pass "
                         f"--text-key with the field that holds the text")
    if max_tokens is not None and len(ids) > max_tokens:
        ids, truncated = ids[:max_tokens], True
    return np.asarray(ids, dtype=np.int64), truncated


def check_prepared_with(prefix: Path, tokenizer_dir: str | Path) -> None:
    """Refuse a prepared dataset whose tokenizer gives other ids than the model's: its loss would mean nothing."""
    from megakv.data.metadata import read_meta
    from megakv.data.tokenizer import encode_alike

    made_with = ((read_meta(prefix) or {}).get("tokenizer") or {}).get("dir")
    if made_with is None:
        return  # made by other tooling (Megatron): nothing says which tokenizer
    data_tokenizer = prefix.parent / made_with
    if data_tokenizer.is_dir() and encode_alike(tokenizer_dir, data_tokenizer) is False:
        raise ValueError(f"{prefix} was prepared with the tokenizer {data_tokenizer}, which gives other token ids "
                         f"than the model's ({tokenizer_dir}): its loss would mean nothing; prepare the data with "
                         f"megakv-prep --tokenizer {tokenizer_dir}")


def read_eval_tokens(data: str | Path, tokenizer_dir: str | Path | None = None, max_tokens: int | None = None,
                     text_key: str = "text", model_eos_ids: tuple[int, ...] = ()) -> EvalTokens:
    """Token ids of `data`: a `.bin/.idx` prefix (also accepted with either suffix; refused when made with a
    tokenizer other than `tokenizer_dir`), or a raw jsonl / parquet / text file (encoded with `tokenizer_dir`),
    with how much of the data they are."""
    prefix = _indexed_prefix(data)
    if prefix is not None:
        from megakv.data.indexed import IndexedDataset, mask_prefix, pair_exists

        if pair_exists(mask_prefix(prefix)):  # its loss would count prompts and padding, unlike training's
            raise ValueError(f"{prefix} holds QA records with a loss mask (megakv-qa prep): a loss over every token "
                             "of its windows (prompts, padding) is not the one training reports. Fix: score the "
                             "records with `megakv-eval --task qa --data RECORDS.jsonl` (answer loss, EM/F1), or "
                             "evaluate on plain text")
        if tokenizer_dir is not None:
            check_prepared_with(prefix, tokenizer_dir)

        available = IndexedDataset(prefix).num_tokens
        tokens = read_indexed_tokens(prefix, max_tokens)
        return EvalTokens(tokens, available, len(tokens) < available)
    path = Path(data)
    if path.is_file():
        if path.suffix in (".bin", ".idx"):
            raise ValueError(f"{path}: the other half of the .bin/.idx pair is missing")
        tokens, truncated = read_raw_tokens(path, tokenizer_dir, max_tokens, text_key, model_eos_ids)
        return EvalTokens(tokens, None if truncated else len(tokens), truncated)
    raise FileNotFoundError(f"evaluation data {data} not found: pass a .bin/.idx prefix (PREFIX.bin and "
                            f"PREFIX.idx exist) or a jsonl / parquet / text file")


def load_eval_tokens(data: str | Path, tokenizer_dir: str | Path | None = None,
                     max_tokens: int | None = None) -> np.ndarray:
    """Token ids of `data` (see read_eval_tokens)."""
    return read_eval_tokens(data, tokenizer_dir, max_tokens).tokens


def make_windows(tokens: np.ndarray, seq_len: int, vocab_size: int) -> torch.Tensor:
    """(n_windows, seq_len + 1) non-overlapping windows: inputs w[:, :-1], targets w[:, 1:].

    Consecutive windows share one boundary token, so every token after the first is predicted exactly
    once. A stream shorter than one window becomes a single shorter window.
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    if len(tokens) < 2:
        raise ValueError(f"evaluation needs at least 2 tokens, the data has {len(tokens)}")
    top = int(tokens.max())
    if top >= vocab_size or int(tokens.min()) < 0:
        raise ValueError(f"the data holds token id {top}, outside the model's vocabulary of {vocab_size}: "
                         f"it was tokenized with another tokenizer")
    width = min(seq_len, len(tokens) - 1) + 1
    n_windows = (len(tokens) - 1) // (width - 1)
    stream = torch.as_tensor(tokens[: n_windows * (width - 1) + 1], dtype=torch.long)
    return stream.unfold(0, width, width - 1)
