"""How a config becomes something DeepSpeed trains, for this process's place in the layout.

Data parallelism (ZeRO 1-3): the dense MegaKVModel inside a DeepSpeedEngine (`DataParallelRunner`).
Tensor parallelism without a pipeline (ZeRO 1-2): this rank's shard of the model (tensor_engine.py).
Pipeline parallelism (ZeRO <= 1): each rank builds only its stage's layers as a PipelineModule
(megakv/parallel/pipeline.py) on the layout's topology (`PipelineRunner`); with parallel.tensor > 1 the
stage's blocks are then split over its tensor group (TP x PP, TP x PP x DP). The loop sees a StepRunner
either way.
"""

from __future__ import annotations

import functools

import torch

from megakv.config import MegaKVConfig
from megakv.config.model import ModelConfig
from megakv.model import MegaKVModel
from megakv.optim.param_groups import weight_decay_groups
from megakv.optim.schedule import WarmupCosineSchedule
from megakv.parallel.context import ParallelContext
from megakv.parallel.masters import fp32_masters_kept, restore_partitioned_masters
from megakv.parallel.materialize import build_zero3_model, materialize_block_shards
from megakv.parallel.runners import DataParallelRunner, PipelineLoss, PipelineRunner, StepRunner
from megakv.parallel.tensor import apply_tensor_parallel_to_blocks
from megakv.parallel.tensor_engine import tensor_data_runner


def build_model(model_cfg: ModelConfig, seed: int) -> MegaKVModel:
    """Weights are a function of (seed, name): every rank starts identical, and so does every stage."""
    torch.manual_seed(seed)
    return MegaKVModel(model_cfg, init_seed=seed)


def recompute_blocks(model: MegaKVModel) -> None:
    """Activation checkpointing for the dense model: each block keeps only its inputs (the hidden state and
    the K/V it reads) and recomputes the rest in the backward, so it attends to the same K/V again."""
    from torch.utils.checkpoint import checkpoint

    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def _initialize(model, parameters, cfg: MegaKVConfig, ds_config: dict, from_weights: bool = False):
    """`from_weights`: the module holds given fp32 weights (checkpoint.init_from) that bf16 must not round."""
    import deepspeed

    with fp32_masters_kept(model, keep=from_weights and cfg.train.precision == "bf16"):
        engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=parameters, config=ds_config,
            lr_scheduler=lambda optimizer: WarmupCosineSchedule(optimizer, cfg.optim, cfg.train.steps))
    return engine


def build_runner(cfg: MegaKVConfig, ctx: ParallelContext, ds_config: dict,
                 init_state: dict[str, torch.Tensor] | None = None) -> StepRunner:
    """The model for this rank (from `init_state`, MegaKVModel names, when given) inside its engine."""
    if ctx.layout.pipeline > 1:
        return _pipeline_runner(cfg, ctx, ds_config, init_state)
    if ctx.layout.tensor != 1:  # TP x DP (megakv/parallel/tensor_engine.py)
        return tensor_data_runner(cfg, ctx, ds_config, init_state,
                                  prepare=recompute_blocks if cfg.train.activation_checkpointing else None)
    if ds_config.get("zero_optimization", {}).get("stage") == 3:  # built partitioned: never whole on a rank
        torch.manual_seed(cfg.train.seed)
        model = build_zero3_model(cfg.model, cfg.train.seed, ds_config, init_state)
        model.rope.to(ctx.device)  # zero.Init places parameters only, and DeepSpeed moves no ZeRO-3 module
    else:
        model = build_model(cfg.model, cfg.train.seed)
        if init_state is not None:
            model.load_state_dict(init_state)
    if cfg.train.activation_checkpointing:
        recompute_blocks(model)
    zero3 = ds_config.get("zero_optimization", {}).get("stage") == 3  # partitioned at build, in bf16
    engine = _initialize(model, weight_decay_groups(model, cfg.optim), cfg, ds_config,
                         from_weights=init_state is not None and not zero3)
    if zero3 and init_state is not None and cfg.train.precision == "bf16":
        restore_partitioned_masters(engine.module, init_state)
    return DataParallelRunner(engine, ctx)


def _pipeline_runner(cfg: MegaKVConfig, ctx: ParallelContext, ds_config: dict,
                     init_state: dict[str, torch.Tensor] | None) -> PipelineRunner:
    from megakv.parallel.partition import block_cuts
    from megakv.parallel.pipeline import DenseNames, load_dense_weights, pipeline_module, stage_blocks

    n_layers, tensor = cfg.model.n_layers, ctx.layout.tensor
    cuts = block_cuts(cfg.model, cfg.parallel.pipeline, cfg.parallel.pipeline_partition)
    loss = PipelineLoss()
    module = pipeline_module(cfg.model, cfg.train.seed, cuts, ctx.topology, loss, cfg.parallel.pipeline_transport,
                             cfg.routing.max_distance, tensor)
    if init_state is not None:  # dense names and shapes: loaded before the blocks are split
        load_dense_weights(module, init_state, n_layers)
    if tensor > 1:  # the stage's blocks are meta skeletons: split them, then fill only this rank's heads
        blocks = stage_blocks(module)
        split = apply_tensor_parallel_to_blocks(blocks.values(), cfg.model, ctx.tensor_group, ctx.layout.tensor_rank,
                                                tensor)
        materialize_block_shards(blocks, cfg.model, split, ctx.layout.tensor_rank, cfg.train.seed, init_state)
    engine = _initialize(module, weight_decay_groups(DenseNames(module, n_layers), cfg.optim), cfg, ds_config,
                         from_weights=init_state is not None)
    return PipelineRunner(engine, ctx, loss)
