"""How the plain MegaKVModel becomes something DeepSpeed trains, and how one step runs through it.

The training loop only talks to a `StepRunner` (train_step / eval_loss). Data parallelism with ZeRO 1-3
is `DataParallelRunner`: forward/backward per micro-batch through the engine, DeepSpeed accumulates and
steps at the boundary. Pipeline parallelism would add a runner around `engine.train_batch` of a
PipelineModule built from the same layers (K/V travelling between stages), and head-split tensor
parallelism would swap the attention/MLP linears before wrapping; both change this file, not the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from megakv.config.model import ModelConfig
from megakv.config.optim import OptimConfig
from megakv.model import MegaKVModel
from megakv.parallel.context import ParallelContext
from megakv.routing import RoutingPlan

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels), each (micro_batch, seq_len)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in fp32 whatever the training precision."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


@dataclass
class StepResult:
    loss_sum: float  # sum over this rank's micro-batches of their mean loss
    micro_batches: int
    applied: bool  # False when DeepSpeed skipped the optimizer step (non-finite gradients)
    grad_norm: float | None


class StepRunner(Protocol):
    engine: Any

    def train_step(self, micro_batches: Sequence[MicroBatch], plans: Sequence[RoutingPlan],
                   poison: bool = False) -> StepResult: ...

    def eval_loss(self, micro_batches: Sequence[MicroBatch], weights: Sequence[float],
                  plan: RoutingPlan) -> tuple[float, float]: ...


def build_model(model_cfg: ModelConfig, seed: int) -> MegaKVModel:
    """Same seed on every rank, so every rank starts from identical weights (DeepSpeed also broadcasts)."""
    torch.manual_seed(seed)
    return MegaKVModel(model_cfg)


class DataParallelRunner:
    def __init__(self, engine: Any, ctx: ParallelContext):
        self.engine, self.ctx = engine, ctx

    def _to_device(self, batch: MicroBatch) -> MicroBatch:
        return batch[0].to(self.ctx.device), batch[1].to(self.ctx.device)

    def train_step(self, micro_batches: Sequence[MicroBatch], plans: Sequence[RoutingPlan],
                   poison: bool = False) -> StepResult:
        engine = self.engine
        engine.train()
        loss_sum = 0.0
        for index, batch in enumerate(micro_batches):
            inputs, labels = self._to_device(batch)
            plan = plans[index % len(plans)]
            loss = causal_lm_loss(engine(inputs, plan=plan), labels)
            if poison:  # fault injection: a non-finite loss whose gradients are non-finite too
                loss = loss * float("nan")
            engine.backward(loss)
            engine.step()  # DeepSpeed applies the optimizer only at the accumulation boundary
            loss_sum += float(loss.detach())
        norm = engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        return StepResult(loss_sum, len(micro_batches), bool(engine.was_step_applied()), norm)

    @torch.no_grad()
    def eval_loss(self, micro_batches: Sequence[MicroBatch], weights: Sequence[float],
                  plan: RoutingPlan) -> tuple[float, float]:
        """(sum of weight x per-sequence mean loss, sum of weights) over this rank's micro-batches."""
        engine = self.engine
        engine.eval()
        total, weight_sum = 0.0, 0.0
        for index, batch in enumerate(micro_batches):
            inputs, labels = self._to_device(batch)
            logits = engine(inputs, plan=plan).float()
            per_token = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
            per_sequence = per_token.mean(dim=1)
            w = torch.tensor(weights[index * len(inputs):(index + 1) * len(inputs)], dtype=per_sequence.dtype,
                             device=per_sequence.device)
            total += float((per_sequence * w).sum())
            weight_sum += float(w.sum())
        engine.train()
        return total, weight_sum


def wrap_model(model: MegaKVModel, ctx: ParallelContext, ds_config: dict, optim_cfg: OptimConfig,
               total_steps: int) -> StepRunner:
    """DeepSpeed engine (AdamW from the config, our LR schedule) around the model, for this layout."""
    import deepspeed

    from megakv.train.param_groups import weight_decay_groups
    from megakv.train.schedule import WarmupCosineSchedule

    if ctx.layout.model_parallel != 1:
        raise NotImplementedError("tensor/pipeline parallel wrapping is not implemented yet")
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=weight_decay_groups(model, optim_cfg), config=ds_config,
        lr_scheduler=lambda optimizer: WarmupCosineSchedule(optimizer, optim_cfg, total_steps))
    return DataParallelRunner(engine, ctx)
