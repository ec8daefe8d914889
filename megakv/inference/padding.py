"""Batching prompts of different lengths: left padding, position ids and boolean attention masks.

Left padding keeps every sequence's newest token in the last column, so one decode step serves the
whole batch. Real tokens get positions 0, 1, ... regardless of how much padding precedes them (the same
rule transformers uses), so a padded prompt computes what it would alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: str | torch.device = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, valid): both (batch, longest prompt); valid is False on padding."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (got an empty batch or an empty prompt)")
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long, device=device)
    valid = torch.zeros(len(prompts), longest, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
        valid[row, longest - len(prompt):] = True
    return ids, valid


def positions_from_valid(valid: torch.Tensor) -> torch.Tensor:
    """Position of each column: count of real tokens before it (padding gets 0)."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0)


def attention_mask(key_valid: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
    """Boolean mask (batch, 1, q_len, k_len), True = may attend, for the last `q_len` of `k_len` positions.

    None when nothing is padded: the attention falls back to its built-in causal mask (faster).
    A padding query is allowed to see itself so its softmax row is never empty (NaN-free); no real
    token ever attends to padding.
    """
    if key_valid is None or bool(key_valid.all()):
        return None
    if q_len == 1 and bool(key_valid[:, -1].all()):  # decode of real tokens: a view, no allocation
        return key_valid[:, None, None, :]
    k_len = key_valid.shape[1]
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=key_valid.device).tril(k_len - q_len)
    mask = causal & key_valid[:, None, None, :]
    own_column = torch.arange(q_len, device=key_valid.device) + (k_len - q_len)
    mask[:, 0, torch.arange(q_len), own_column] = True
    return mask
