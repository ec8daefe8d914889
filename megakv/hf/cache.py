"""A transformers `Cache` that stores K/V for the retained layers only (the cache shared across depth).

Built on transformers' public cache API as it exists in every supported version (`Cache(layers=...)` and
`DynamicLayer`): one `DynamicLayer` per layer that projects K/V under the deployment plan; a
non-retained layer owns no storage and attends with the cache of its source layer mu(l), which the
model reads itself. So `len(cache.layers) == |S|` and the bytes held are exactly |S|/L of a full cache.

Generic Cache methods that `generate` calls (`get_seq_length`, `crop`, `reorder_cache`,
`batch_select_indices`, ...) iterate over `self.layers` and work unchanged.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from megakv.routing import RoutingPlan


class SharedDepthCache(Cache):
    """K/V storage for the layers of `plan.retained`; `update(k, v, layer)` appends to that layer's slot."""

    def __init__(self, plan: RoutingPlan):
        self.plan = plan
        self.retained = plan.retained
        self._slot = {layer: slot for slot, layer in enumerate(self.retained)}
        super().__init__(layers=[DynamicLayer() for _ in self.retained])

    def slot_of(self, layer_idx: int) -> int:
        """The storage slot layer `layer_idx` reads: its own if retained, else its source's."""
        return self._slot[self.plan[layer_idx]]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               cache_kwargs: dict | None = None, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx not in self._slot:
            raise ValueError(f"layer {layer_idx} holds no cache under retain {list(self.retained)}: it reads "
                             f"layer {self.plan[layer_idx]}'s K/V and must not write its own")
        return self.layers[self._slot[layer_idx]].update(key_states, value_states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.layers[self.slot_of(layer_idx)].get_seq_length() if self.layers else 0

    def bytes_held(self) -> int:
        """Bytes of K/V storage currently allocated (keys + values of every slot)."""
        total = 0
        for layer in self.layers:
            for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total
