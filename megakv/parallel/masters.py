"""fp32 master weights of a bf16 run that starts from fp32 weights (`checkpoint.init_from`).

DeepSpeed casts the module to bf16 and builds the optimizer's fp32 masters from that copy, so a model
directory's fp32 weights would lose their low bits at the start of fine-tuning (up to 3.9e-3 relative per
weight). The values are copied aside before the engine is built and written into its masters afterwards.
"""

from __future__ import annotations

import torch
from torch import nn


def fp32_copies(module: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor]]:
    """This rank's parameters (shards, stages) with a CPU fp32 copy of their current values."""
    return [(p, p.detach().to("cpu", torch.float32, copy=True)) for p in module.parameters() if p.numel()]


def restore_masters(copies: list[tuple[nn.Parameter, torch.Tensor]]) -> None:
    """Write the copies into the built optimizer's fp32 masters (ZeRO-1/2: each rank its own partition)."""
    from deepspeed.utils import safe_set_full_fp32_param

    for param, value in copies:
        safe_set_full_fp32_param(param, value.to(param.device))
