"""The module tree the engine runs: the model with its decode-time fast paths swapped in from outside.

`decode_view(model, prepack=..., attention_kernel=...)` is a shallow copy of the module tree in which
- every wide enough nn.Linear becomes a PackedLinear holding a oneDNN-prepacked weight
  (megakv/inference/prepacked.py), and
- every Attention becomes a NativeDecodeAttention whose one-token calls use the native kernel
  (megakv/inference/native_attention.py).
The copy shares the original's parameters, buffers and forward hooks (the same objects), so nothing is
trained or stored twice except the packed weights, and a hook on `model.layers[i].attn.k_proj` still sees
every call the engine makes. The model itself is never modified; with nothing to swap it is returned as is.
"""

from __future__ import annotations

import copy

from torch import nn

from megakv.inference.native_attention import DecodeAttentionKernel, NativeDecodeAttention
from megakv.inference.prepacked import MIN_PACKED_OUT, PackedLinear, PackedWeight, prepacking_available
from megakv.model import Attention


def _shallow_tree(module: nn.Module, prepack: bool, kernel: DecodeAttentionKernel | None) -> nn.Module:
    clone = copy.copy(module)  # the same _parameters, _buffers and hook dicts: nothing is duplicated
    clone._modules = {name: None if child is None else _shallow_tree(child, prepack, kernel)
                      for name, child in module._modules.items()}
    if prepack and type(module) is nn.Linear and module.out_features >= MIN_PACKED_OUT:
        clone.__class__ = PackedLinear
        clone.packed_weight = PackedWeight()
    elif kernel is not None and type(module) is Attention:
        clone.__class__ = NativeDecodeAttention
        clone.decode_kernel = kernel
    return clone


def decode_view(model: nn.Module, prepack: bool = True, attention_kernel: DecodeAttentionKernel | None = None
                ) -> nn.Module:
    """`model` with prepacked decode matmuls (where oneDNN can help) and native decode attention (with a
    kernel); `model` itself when neither applies."""
    prepack = prepack and prepacking_available(next(model.parameters()))
    if not prepack and attention_kernel is None:
        return model
    return _shallow_tree(model, prepack, attention_kernel)
