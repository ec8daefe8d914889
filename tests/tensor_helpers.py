"""Test-side references for tensor parallelism: the per-rank shards of a dense state dict, and the dense state
dict gathered back from a tensor-parallel model (both built from the product's per-tensor pieces)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from megakv.parallel.tensor_split import TensorSplit, merge_state_dicts, shard_tensor


def shard_state_dict(dense: Mapping[str, torch.Tensor], split: TensorSplit, rank: int) -> dict[str, torch.Tensor]:
    """The state dict tensor rank `rank` loads, sliced from a dense MegaKVModel state dict."""
    if not 0 <= rank < split.tensor:
        raise ValueError(f"tensor rank {rank} is outside 0..{split.tensor - 1}")
    return {name: shard_tensor(name, value, split, rank) for name, value in dense.items()}


def gather_dense_state_dict(model: torch.nn.Module, tp_group, split: TensorSplit) -> dict[str, torch.Tensor]:
    """The dense state dict of a tensor-parallel model, on every rank of its tensor group."""
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(split.tensor)]
    for name, value in model.state_dict().items():
        value = value.detach().contiguous()
        gathered = [torch.empty_like(value) for _ in range(split.tensor)]
        dist.all_gather(gathered, value, group=tp_group)
        for rank, piece in enumerate(gathered):
            shards[rank][name] = piece
    return merge_state_dicts(shards, split)
