"""A KV cache that holds only the retained layers of a deployment plan.

Layout: one preallocated buffer per retained layer, of shape (2, batch, n_kv_heads, max_len, head_dim)
(K and V side by side). Preallocating for the maximum length (prompt + new tokens) keeps decode free of
reallocation and copies, and makes the footprint exact and known before generation:

    nbytes = 2 * |S| * n_kv_heads * head_dim * element_size * batch * max_len

Layers outside S own no storage at all; they read the buffer of mu(l) (see megakv/inference/engine.py).
One allocation per layer (not one for all) is what lets `drop_layers` free a layer's cache at once,
without copying the layers that stay (elastic retention).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megakv.config.model import ModelConfig

KV = tuple[torch.Tensor, torch.Tensor]


def kv_bytes_per_token(cfg: ModelConfig, n_retained: int, dtype: torch.dtype) -> int:
    """Cache bytes one token costs (per sequence): 2 * |S| * n_kv_heads * head_dim * element size."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * n_retained * cfg.n_kv_heads * cfg.resolved_head_dim * element_size


class RetainedKVCache:
    """K/V of the retained layers for `batch` sequences of up to `max_len` tokens.

    A forward step writes the new positions of each retained layer with `extend(layer, kv)` (which returns
    the K/V of the whole sequence so far) and then calls `advance(n)` once, after all layers.
    """

    def __init__(self, cfg: ModelConfig, retained: Sequence[int], batch: int, max_len: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        if batch < 1 or max_len < 1:
            raise ValueError(f"a cache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        bad = [layer for layer in retained if not 0 <= layer < cfg.n_layers]
        if bad or not retained:
            raise ValueError(f"retained layers {list(retained)} must be a non-empty subset of 0..{cfg.n_layers - 1}")
        self.retained = tuple(sorted(set(retained)))
        self.max_len = max_len
        self.length = 0  # positions already written (committed by `advance`)
        self.buffers = {layer: torch.empty(2, batch, cfg.n_kv_heads, max_len, cfg.resolved_head_dim, dtype=dtype,
                                           device=device) for layer in self.retained}
        self.batch = batch
        self._token_bytes_per_layer = kv_bytes_per_token(cfg, 1, dtype)

    @property
    def bytes_per_token(self) -> int:
        """Per sequence: 2 * |S| * n_kv_heads * head_dim * element size."""
        return self._token_bytes_per_layer * len(self.retained)

    @property
    def nbytes(self) -> int:
        """Bytes allocated for the cache (all sequences, all `max_len` positions)."""
        return sum(buffer.untyped_storage().nbytes() for buffer in self.buffers.values())

    def holds(self, layer: int) -> bool:
        return layer in self.buffers

    def drop_layers(self, keep: Sequence[int]) -> None:
        """Keep only the layers `keep` (a subset of the retained ones): the others' buffers are freed now."""
        kept = tuple(sorted(set(keep)))
        extra = [layer for layer in kept if layer not in self.buffers]
        if extra or not kept:
            raise ValueError(f"cannot keep layers {list(kept)}: the cache holds only {list(self.retained)}, and a "
                             f"dropped layer's K/V cannot come back without recomputing the prefix")
        for layer in self.retained:
            if layer not in kept:
                del self.buffers[layer]  # the only reference: its memory is released here
        self.retained = kept

    def extend(self, layer: int, kv: KV) -> KV:
        """Write `kv` (the new positions of `layer`) after the committed ones; return K/V of the whole prefix."""
        buffer = self.buffers.get(layer)
        if buffer is None:
            raise KeyError(f"layer {layer} is not retained (retained: {list(self.retained)}): it owns no cache")
        end = self.length + kv[0].shape[2]
        if end > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions, writing up to {end}: allocate a larger "
                             f"cache (max_len >= prompt length + new tokens)")
        keys, values = buffer[0], buffer[1]
        keys[:, :, self.length:end] = kv[0]
        values[:, :, self.length:end] = kv[1]
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        """Commit `n` new positions (call once per forward step, after every retained layer has written)."""
        if self.length + n > self.max_len:
            raise ValueError(f"cannot advance past max_len={self.max_len}")
        self.length += n
