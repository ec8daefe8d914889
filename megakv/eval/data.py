"""Held-out tokens for evaluation: a Megatron `.bin/.idx` pair (by prefix) or a plain text file.

Both become one token stream (documents concatenated in order, as prepared: the data tooling ends every
document with eos), cut into non-overlapping windows so every plan is scored on exactly the same tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


def _indexed_prefix(data: str | Path) -> Path | None:
    text = str(data)
    for suffix in (".bin", ".idx"):
        if text.endswith(suffix):
            text = text[: -len(suffix)]
    prefix = Path(text)
    return prefix if Path(f"{prefix}.idx").is_file() and Path(f"{prefix}.bin").is_file() else None


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


def read_text_tokens(path: str | Path, tokenizer_dir: str | Path | None, max_tokens: int | None) -> np.ndarray:
    if tokenizer_dir is None:
        raise ValueError(f"{path} is a text file, but the model has no tokenizer: pass --tokenizer DIR, or "
                         f"evaluate on a prepared .bin/.idx prefix")
    from megakv.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    text = Path(path).read_text(encoding="utf-8")
    # Paragraphs become documents ended by eos, the layout the data tooling gives training documents.
    ids: list[int] = []
    for paragraph in (p for p in text.split("\n\n") if p.strip()):
        ids.extend(tokenizer.encode(paragraph))
        ids.append(tokenizer.eos_id)
        if max_tokens is not None and len(ids) >= max_tokens:
            break
    tokens = np.asarray(ids, dtype=np.int64)
    return tokens if max_tokens is None else tokens[:max_tokens]


def load_eval_tokens(data: str | Path, tokenizer_dir: str | Path | None = None,
                     max_tokens: int | None = None) -> np.ndarray:
    """Token ids of `data`: a `.bin/.idx` prefix (also accepted with either suffix) or a text file."""
    prefix = _indexed_prefix(data)
    if prefix is not None:
        return read_indexed_tokens(prefix, max_tokens)
    path = Path(data)
    if path.is_file():
        if path.suffix in (".bin", ".idx"):
            raise ValueError(f"{path}: the other half of the .bin/.idx pair is missing")
        return read_text_tokens(path, tokenizer_dir, max_tokens)
    raise FileNotFoundError(f"evaluation data {data} not found: pass a .bin/.idx prefix (PREFIX.bin and "
                            f"PREFIX.idx exist) or a text file")


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
