"""Head-split tensor parallelism, applied to a built MegaKVModel from outside (as torchtitan's apply_tp).

`apply_tensor_parallel` swaps each block's q/k/v/gate/up for column-parallel linears and o/down for
row-parallel ones holding this rank's slice of the dense weights (megakv/parallel/tensor_split.py).
The embedding, the head and all norms stay replicated (no vocab-parallel head in v1). The model code is
untouched: its attention views take the head count from the projection width.

Communication is Megatron's pair of autograd ops: `f` (identity forward, all-reduce of the input grad
backward) enters the split region, `g` (all-reduce forward, identity backward) leaves each row-parallel
linear. In a model, `f` is applied once to the output of attn_norm (read by q/k/v only) and of mlp_norm
(read by gate/up only), through forward hooks, rather than in each of the five column-parallel linears:
per block two all-reduces forward and two backward, as in Megatron, instead of up to five. A routed layer
attends with the K/V its source layer computed on the same rank: those are this rank's K/V heads, so
routing needs no communication (the plan must be the same on every tensor rank).

Two kinds of replicated parameters see only this rank's heads and so get partial gradients: the per-head
q/k norms, and K/V projections replicated over several ranks (n_kv_heads < T). Hooks on those parameters
sum their gradients over the tensor group before they are accumulated, which is also before DeepSpeed's
ZeRO gradient hooks see them. Split parameters are marked `tensor_model_parallel` (with Megatron's
`partition_dim`/`partition_stride`), which is how DeepSpeed's grad norm and clipping count them once per
rank instead of only on tensor rank 0.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megakv.config.model import ModelConfig
from megakv.model import Block, MegaKVModel
from megakv.parallel.tensor_split import TensorSplit, shard_tensor, split_of, tensor_split

COLUMN_PARALLEL = ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW_PARALLEL = ("attn.o_proj", "mlp.down_proj")


class _CopyToTensorRegion(torch.autograd.Function):
    """Megatron's f: the replicated input enters the split region; input grads are summed over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorRegion(torch.autograd.Function):
    """Megatron's g: partial outputs of the split region are summed; the grad passes through unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def copy_to_tensor_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _CopyToTensorRegion.apply(x, group)


def reduce_from_tensor_region(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _ReduceFromTensorRegion.apply(x, group)


class ColumnParallelLinear(nn.Module):
    """y_local = x W_local^T + b_local: this rank's output rows; the output stays split.

    enters_region=False: the input already passed through `f` (input grads are summed there, once).
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup,
                 enters_region: bool = True):
        super().__init__()
        self.group, self.enters_region = group, enters_region
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enters_region:
            x = copy_to_tensor_region(x, self.group)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, local_out_features={self.weight.shape[0]}"


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_local W_local^T, then the (replicated) bias once."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, group: dist.ProcessGroup):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(weight)
        self.bias = None if bias is None else nn.Parameter(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = reduce_from_tensor_region(F.linear(x, self.weight), self.group)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"local_in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}"


def _mark_split(param: nn.Parameter, dim: int, counted_in_norm: bool = True) -> None:
    # DeepSpeed counts a parameter in the global grad norm on every tensor rank if it is marked, else only
    # on tensor rank 0 (runtime/utils.py is_model_parallel_parameter). A K/V replica is counted once, on
    # the first rank of its replica group.
    param.tensor_model_parallel = counted_in_norm
    param.partition_dim = dim
    param.partition_stride = 1


def _sum_grad_over_group(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    grad = grad.contiguous().clone()
    dist.all_reduce(grad, group=group)
    return grad


def _sum_grad_over_replicas(grad: torch.Tensor, group: dist.ProcessGroup, slot: int, slots: int) -> torch.Tensor:
    """Sum the gradient over the ranks holding the same K/V replica (`slot`), with one tensor-group call."""
    buffer = grad.new_zeros((slots, *grad.shape))
    buffer[slot] = grad
    dist.all_reduce(buffer, group=group)
    return buffer[slot]


def _enter_tensor_region(module: nn.Module, args: tuple, output: torch.Tensor,
                         group: dist.ProcessGroup) -> torch.Tensor:
    return copy_to_tensor_region(output, group)


def _dense_slices(module: nn.Linear, name: str, split: TensorSplit, rank: int) -> tuple[torch.Tensor, ...]:
    weight = shard_tensor(name + ".weight", module.weight.detach(), split, rank)
    bias = None if module.bias is None else shard_tensor(name + ".bias", module.bias.detach(), split, rank)
    return weight, bias


def apply_tensor_parallel(model: MegaKVModel, tp_group: dist.ProcessGroup, tp_rank: int,
                          tp_size: int) -> TensorSplit:
    """Turn a dense, built model into tensor rank `tp_rank`'s part, in place; returns the split used.

    Every tensor rank must pass the same dense weights (same seed). Raises ConfigError if the model's
    heads or MLP width do not split over `tp_size` ranks.
    """
    return apply_tensor_parallel_to_blocks(model.layers, model.cfg, tp_group, tp_rank, tp_size)


def apply_tensor_parallel_to_blocks(blocks: Iterable[Block], cfg: ModelConfig, tp_group: dist.ProcessGroup,
                                    tp_rank: int, tp_size: int) -> TensorSplit:
    """`apply_tensor_parallel` on some blocks of a model (a pipeline stage's); the embedding, final norm
    and head, wherever they live, stay replicated."""
    split = tensor_split(cfg, tp_size)
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor rank {tp_rank} is outside 0..{tp_size - 1}")
    if dist.get_world_size(tp_group) != tp_size or dist.get_rank(tp_group) != tp_rank:
        raise ValueError(f"the tensor group has rank {dist.get_rank(tp_group)} of {dist.get_world_size(tp_group)}, "
                         f"expected {tp_rank} of {tp_size}")
    kv_hook = functools.partial(_sum_grad_over_replicas, group=tp_group, slot=split.kv_group(tp_rank),
                                slots=split.kv_groups)
    for block in blocks:
        prefix = "block"  # split_of reads only the suffix of a parameter name
        for path in COLUMN_PARALLEL + ROW_PARALLEL:
            owner_name, attr = path.split(".")
            owner = getattr(block, owner_name)
            name = f"{prefix}.{path}"
            weight, bias = _dense_slices(getattr(owner, attr), name, split, tp_rank)
            if path in COLUMN_PARALLEL:
                parallel = ColumnParallelLinear(weight, bias, tp_group, enters_region=False)
            else:
                parallel = RowParallelLinear(weight, bias, tp_group)
            parallel = parallel.to(getattr(owner, attr).weight.device)
            setattr(owner, attr, parallel)
            for param_name, param in parallel.named_parameters():
                where = split_of(f"{name}.{param_name}")
                if where is None:  # the row-parallel bias: replicated, complete gradient on every rank
                    continue
                part, dim = where
                if part == "kv" and split.kv_replicas > 1:
                    _mark_split(param, dim, counted_in_norm=split.is_first_kv_replica(tp_rank))
                    param.register_hook(kv_hook)
                else:
                    _mark_split(param, dim)
        for norm in (block.attn_norm, block.mlp_norm):  # their outputs feed only column-parallel linears
            norm.register_forward_hook(functools.partial(_enter_tensor_region, group=tp_group))
        for norm in (block.attn.q_norm, block.attn.k_norm):
            if norm is not None:  # one weight shared by all heads, of which this rank sees its own only
                norm.weight.register_hook(functools.partial(_sum_grad_over_group, group=tp_group))
    return split
