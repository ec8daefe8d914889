"""fp32 master weights of a bf16 run that starts from fp32 weights (`checkpoint.init_from`).

DeepSpeed casts the module to bf16 and builds the optimizer's fp32 masters from that copy, so a model
directory's fp32 weights would lose their low bits at the start of fine-tuning (up to 3.9e-3 relative per
weight). The values are copied aside before the engine is built and written into its masters afterwards;
under ZeRO-3, whose build partitions the weights in bf16, each rank writes its own partition of each weight
from the model directory.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

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


@contextmanager
def fp32_masters_kept(module: nn.Module, keep: bool) -> Iterator[None]:
    """Around an engine's build: when `keep`, the module's fp32 values become the built optimizer's masters."""
    copies = fp32_copies(module) if keep else None
    yield
    if copies is not None:
        restore_masters(copies)


def restore_partitioned_masters(module: nn.Module, values: Mapping[str, torch.Tensor]) -> None:
    """ZeRO-3: each rank writes its partition of every parameter's fp32 value (`values`: MegaKVModel names,
    read one tensor at a time) into the optimizer's masters; the last partition's padding stays zero."""
    import torch.distributed as dist
    from deepspeed.utils import safe_set_local_fp32_param

    for name, param in module.named_parameters():
        size = param.ds_tensor.ds_numel  # every rank's partition has this many elements, padding included
        start = dist.get_rank(group=param.ds_process_group) * size
        piece = values[name].detach().to(torch.float32).flatten()[start:start + size]
        local = torch.zeros(size, dtype=torch.float32)
        local[:piece.numel()] = piece
        safe_set_local_fp32_param(param, local.to(param.ds_tensor.device))
