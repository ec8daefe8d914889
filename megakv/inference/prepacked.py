"""Decode-sized matmuls through weights prepacked once by oneDNN (CPU, fp32).

Why: a decode step multiplies a few rows (one per sequence) by every weight. MKL's sgemm, which
F.linear uses, repacks the weight on every call and reaches about 5 GB/s of weight reads at 8 rows on
one core; oneDNN with the weight reordered once into its blocked layout reaches about 7 GB/s at 8 rows
and about 10 GB/s at 2 rows (benchmarks/bench_inference.py measures both). That holds for weights with
many output rows; measured per shape (8 and 2 rows, weights streamed from DRAM): oneDNN took 0.43-0.90x
MKL's time at 704-8192 outputs but 1.05-1.2x at 256 outputs (e.g. K/V projections, the demo's
attention), so only weights with at least MIN_PACKED_OUT outputs are packed. At one row (a GEMV) and at
prefill sizes MKL is as fast or faster, so those keep F.linear.

megakv/inference/decode_view.py swaps PackedLinear in for every wide enough nn.Linear of a shallow copy
of the model (the model itself is untouched). A packed weight is rebuilt when the module's parameter is another
one, or was written in place (the tensor's version counter) since it was packed, so it never serves stale weights.
Cost: one more copy of the linear weights in memory while the engine lives, built at the first
decode-sized call (a prefill-only or batch-1 user never pays it; InferenceEngine(prepack=False) opts out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Row counts (tokens x batch in one call) that take the packed path: where oneDNN measured faster than MKL.
MIN_PACKED_ROWS, MAX_PACKED_ROWS = 2, 64
PACK_ROWS_HINT = 8  # the row count the blocked layout is chosen for (oneDNN takes it as a hint)
MIN_PACKED_OUT = 512  # narrower weights stay on MKL (slower packed, see above)


def prepacking_available(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedWeight:
    """The oneDNN-packed copy of the weight (out, in) it is called with, repacked whenever that weight changes:
    another Parameter (`load_state_dict(..., assign=True)` replaces them), written in place, or its storage
    swapped as `param.data = ...` does. Callers pass the module's current weight at every call."""

    def __init__(self):
        self._packed, self._packed_from = None, None

    def packed(self, weight: torch.Tensor) -> torch.Tensor:
        # The weight object itself is held (not its id), so a new tensor can never pass for the packed one.
        storage = (weight.data_ptr(), weight._version)
        if self._packed_from is None or self._packed_from[0] is not weight or self._packed_from[1] != storage:
            with torch.no_grad():
                self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_ROWS_HINT)
            self._packed_from = (weight, storage)
        return self._packed

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if not MIN_PACKED_ROWS <= rows <= MAX_PACKED_ROWS or torch.is_grad_enabled() or x.dtype != torch.float32:
            return F.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed(weight), bias, "none", [], "")


class PackedLinear(nn.Linear):
    """An nn.Linear whose decode-sized calls use its prepacked weight (built by `decode_view` only)."""

    packed_weight: PackedWeight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed_weight.linear(x, self.weight, self.bias)
