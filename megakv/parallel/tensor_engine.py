"""A DeepSpeed engine around a tensor-parallel MegaKVModel (TP x DP with ZeRO 1 or 2), and its StepRunner.

DeepSpeed learns the layout through its `mpu` argument, here its own `PipelineParallelGrid` on the
layout's `PipeModelDataParallelTopology` (megakv's rank order, megakv/parallel/context.py). With it:
ZeRO partitions and reduces over the data group only; the initial broadcast runs within each data group,
so tensor ranks keep their different shards; and the grad norm used for clipping sums the squares of
marked (split) parameters on every tensor rank and of replicated ones on tensor rank 0, over the
model-parallel group: the global norm of the dense model. ZeRO-3 is refused: it would partition the
shards again and its parameter hooks are untested with the tensor-group gradient hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from megakv.config import MegaKVConfig
from megakv.config.model import ModelConfig
from megakv.config.parallel import check_tensor_zero_stage  # also checked at launch (validate_layout)
from megakv.model import MegaKVModel
from megakv.optim.param_groups import weight_decay_groups
from megakv.optim.schedule import WarmupCosineSchedule
from megakv.parallel.context import ParallelContext
from megakv.parallel.masters import fp32_masters_kept
from megakv.parallel.materialize import materialize_tensor_shards, skeleton_model
from megakv.parallel.runners import DataParallelRunner
from megakv.parallel.tensor import apply_tensor_parallel
from megakv.parallel.tensor_split import TensorSplit


def tensor_parallel_grid(topology: Any):
    """DeepSpeed's view of the layout (data, tensor-slice and model-parallel groups); collective on all ranks."""
    from deepspeed.runtime.pipe.topology import PipelineParallelGrid

    return PipelineParallelGrid(topology=topology)


def build_tensor_parallel_model(model_cfg: ModelConfig, seed: int, grid: Any,
                                init_state: Mapping[str, torch.Tensor] | None = None
                                ) -> tuple[MegaKVModel, TensorSplit]:
    """The dense model for `seed` (or `init_state`, dense names), cut to this rank's tensor shard.

    The meta-device skeleton is split first, then filled one leaf at a time (megakv/parallel/materialize.py):
    a rank holds its shard plus, transiently, one dense parameter, never the whole dense model.
    """
    model = skeleton_model(model_cfg)
    split = apply_tensor_parallel(model, grid.get_slice_parallel_group(), grid.get_slice_parallel_rank(),
                                  grid.get_slice_parallel_world_size())
    materialize_tensor_shards(model, split, grid.get_slice_parallel_rank(), seed, init_state)
    return model, split


def initialize_tensor_parallel(model: MegaKVModel, model_parameters: Any, ds_config: dict, grid: Any,
                               lr_scheduler: Callable | None = None):
    """deepspeed.initialize with the layout's grid as mpu; returns the engine."""
    import deepspeed

    check_tensor_zero_stage(int(ds_config.get("zero_optimization", {}).get("stage", 0)),
                            grid.get_slice_parallel_world_size())
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model_parameters, config=ds_config,
                                           mpu=grid, lr_scheduler=lr_scheduler)
    return engine


def tensor_data_runner(cfg: MegaKVConfig, ctx: ParallelContext, ds_config: dict,
                       init_state: Mapping[str, torch.Tensor] | None = None,
                       prepare: Callable[[MegaKVModel], None] | None = None) -> DataParallelRunner:
    """TP x DP (one pipeline stage): this rank's shard in a ZeRO-1/2 engine, stepped like data parallelism.

    The same StepRunner as plain data parallelism: tensor peers get the same micro-batches and plans
    (both follow the data rank), so only the engine's mpu and the model's shards differ. `prepare` runs on
    the sharded model before the engine wraps it (activation checkpointing: tensor peers recompute the
    same blocks, so the recomputed forward's collectives pair up).
    """
    if ctx.layout.pipeline != 1:
        raise ValueError("tensor_data_runner runs one pipeline stage; with parallel.pipeline > 1 the pipeline "
                         "runner (megakv/parallel/wrap.py) splits each stage's blocks")
    grid = tensor_parallel_grid(ctx.topology)
    model, _ = build_tensor_parallel_model(cfg.model, cfg.train.seed, grid, init_state)
    if prepare is not None:
        prepare(model)
    # the shards' fp32 values become the masters, not their bf16 rounding (megakv/parallel/masters.py)
    with fp32_masters_kept(model, keep=init_state is not None and cfg.train.precision == "bf16"):
        engine = initialize_tensor_parallel(
            model, weight_decay_groups(model, cfg.optim), ds_config, grid,
            lr_scheduler=lambda optimizer: WarmupCosineSchedule(optimizer, cfg.optim, cfg.train.steps))
    return DataParallelRunner(engine, ctx)
