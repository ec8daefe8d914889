"""How a config becomes something DeepSpeed trains, for this process's place in the layout.

Data parallelism (ZeRO 1-3): the dense MegaKVModel inside a DeepSpeedEngine (`DataParallelRunner`).
Pipeline parallelism (ZeRO <= 1): each rank builds only its stage's layers as a PipelineModule
(megakv/parallel/pipeline.py) on the layout's topology (`PipelineRunner`). The loop sees a StepRunner
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
from megakv.parallel.runners import DataParallelRunner, PipelineLoss, PipelineRunner, StepRunner
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


def _initialize(model, parameters, cfg: MegaKVConfig, ds_config: dict):
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=parameters, config=ds_config,
        lr_scheduler=lambda optimizer: WarmupCosineSchedule(optimizer, cfg.optim, cfg.train.steps))
    return engine


def build_runner(cfg: MegaKVConfig, ctx: ParallelContext, ds_config: dict,
                 init_state: dict[str, torch.Tensor] | None = None) -> StepRunner:
    """The model for this rank (from `init_state`, MegaKVModel names, when given) inside its engine."""
    if ctx.layout.tensor != 1:  # TP x DP (megakv/parallel/tensor_engine.py); TP x PP is refused there
        return tensor_data_runner(cfg, ctx, ds_config, init_state,
                                  prepare=recompute_blocks if cfg.train.activation_checkpointing else None)
    if ctx.layout.pipeline == 1:
        model = build_model(cfg.model, cfg.train.seed)
        if init_state is not None:
            model.load_state_dict(init_state)
        if cfg.train.activation_checkpointing:
            recompute_blocks(model)
        engine = _initialize(model, weight_decay_groups(model, cfg.optim), cfg, ds_config)
        return DataParallelRunner(engine, ctx)
    return _pipeline_runner(cfg, ctx, ds_config, init_state)


def _pipeline_runner(cfg: MegaKVConfig, ctx: ParallelContext, ds_config: dict,
                     init_state: dict[str, torch.Tensor] | None) -> PipelineRunner:
    from megakv.parallel.partition import block_cuts
    from megakv.parallel.pipeline import DenseNames, load_dense_weights, pipeline_module

    n_layers = cfg.model.n_layers
    cuts = block_cuts(cfg.model, cfg.parallel.pipeline, cfg.parallel.pipeline_partition)
    loss = PipelineLoss()
    module = pipeline_module(cfg.model, cfg.train.seed, cuts, ctx.topology, loss, cfg.parallel.pipeline_transport,
                             cfg.routing.max_distance)
    if init_state is not None:
        load_dense_weights(module, init_state, n_layers)
    engine = _initialize(module, weight_decay_groups(DenseNames(module, n_layers), cfg.optim), cfg, ds_config)
    return PipelineRunner(engine, ctx, loss)
