"""The seam between the training loop and DeepSpeed: a StepRunner runs one optimizer step or one
evaluation and answers what the loop needs (learning rate, grad norm, whether the step was applied).

`DataParallelRunner` (ZeRO 1-3): forward/backward per micro-batch through the engine; DeepSpeed
accumulates and steps at the boundary. `PipelineRunner`: one `engine.train_batch` over the step's
micro-batches, each carrying its routing plan as an int tensor through every stage.

Loss figures are this data-parallel replica's: the loop sums them over the data group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from megakv.data.sft import IGNORE
from megakv.parallel.context import ParallelContext
from megakv.routing import RoutingPlan

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # (inputs, labels), each (micro_batch, seq_len)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor,
                   tokens_per_micro_batch: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy over the labels that count (IGNORE = -100 marks the others, e.g. a QA prompt:
    megakv/data/sft.py), in fp32 whatever the training precision: their mean (0 when none counts), or, given
    the step's counted labels per micro-batch, their sum divided by it. Gradient accumulation and data
    parallelism average micro-batch losses; with the second form that average is the step's mean over its
    tokens, so a micro-batch with few answer tokens does not weigh more, whatever the micro-batch size."""
    flat = labels.reshape(-1)
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat, reduction="sum")
    if tokens_per_micro_batch is not None:  # a tensor divisor: the same division kernel as the count's below
        return total / total.new_full((), tokens_per_micro_batch)
    return total / (flat != IGNORE).sum().clamp(min=1)


def counted_labels(labels: torch.Tensor) -> int:
    """The labels that count in the loss (the others are IGNORE)."""
    return int((labels != IGNORE).sum())


def weighted_token_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over sequences of weight x the sequence's summed next-token loss over counted labels (validation
    divides by the weighted count of those labels: a mean over tokens, as megakv-eval reports)."""
    per_token = F.cross_entropy(logits.float().transpose(1, 2), labels, reduction="none")
    return (per_token.sum(dim=1) * weights.to(per_token.dtype)).sum()


def weighted_label_count(labels: torch.Tensor, weights: torch.Tensor) -> float:
    return float(((labels != IGNORE).sum(dim=1).to(torch.float64) * weights).sum())


@dataclass
class StepResult:
    loss_sum: float  # sum over this data-parallel replica's micro-batches of their loss (causal_lm_loss)
    micro_batches: int
    applied: bool  # False when DeepSpeed skipped the optimizer step (non-finite gradients)
    grad_norm: float | None


class StepRunner(Protocol):
    engine: Any  # what checkpoints save and load; the loop never calls it

    def train_step(self, micro_batches: Sequence[MicroBatch], plans: Sequence[RoutingPlan],
                   tokens_per_micro_batch: float | None = None, poison: bool = False) -> StepResult:
        """This rank's micro-batches; `plans`: the step's plan, or one per global micro-batch slot;
        `tokens_per_micro_batch`: the step's counted labels over all its micro-batches (causal_lm_loss)."""

    def eval_loss(self, micro_batches: Sequence[MicroBatch], weights: Sequence[float],
                  plan: RoutingPlan) -> tuple[float, float]:
        """(sum of weight x summed loss over each sequence's counted labels, weighted count of those labels)."""

    def learning_rate(self) -> float: ...


def rank_plans(step_plans: Sequence[RoutingPlan], data_rank: int, data_parallel: int) -> list[RoutingPlan]:
    """This data-parallel rank's micro-batch plans out of the step's (one plan: the step's plan).

    Per-micro-batch plans are one per global micro-batch slot; the loader gives rank r the r-th contiguous
    slice of the step's samples, so its k-th micro-batch is slot r * per_rank + k.
    """
    if len(step_plans) == 1:
        return list(step_plans)
    if len(step_plans) % data_parallel:
        raise ValueError(f"{len(step_plans)} micro-batch plans do not split over {data_parallel} data-parallel ranks")
    per_rank = len(step_plans) // data_parallel
    return list(step_plans[data_rank * per_rank:(data_rank + 1) * per_rank])


def kept_kv(step_plans: Sequence[RoutingPlan], data_parallel: int, every_layer: bool = False) -> list[frozenset[int]]:
    """Per local micro-batch index: layers whose K/V some data-parallel replica reads at that index.

    Replicas running different plans must still call the same modules and produce gradients for the
    same parameters in each micro-batch (ZeRO reduces gradient buckets and, at stage 3, gathers each
    module's weights collectively), so every replica projects these K/V, unread ones with weight zero.
    `every_layer` (optimizer offload): every layer's K/V in every micro-batch, see `offloads_optimizer`.
    """
    if every_layer:
        return [frozenset(range(len(step_plans[0].kv_needed)))]
    if len(step_plans) == 1 or data_parallel == 1:
        return [frozenset()]
    per_rank = len(step_plans) // data_parallel
    return [frozenset(j for r in range(data_parallel) for j, needed in
                      enumerate(step_plans[r * per_rank + k].kv_needed) if needed) for k in range(per_rank)]


def _weights_of(weights: Sequence[float], index: int, size: int) -> torch.Tensor:
    return torch.tensor(weights[index * size:(index + 1) * size], dtype=torch.float64)


def offloads_optimizer(engine: Any) -> bool:
    """ZeRO with offload_optimizer, where DeepSpeed 0.19 keeps CPU gradient copies that R-CLA's unread K/V
    projections corrupt in two ways beyond `clear_stale_gradients`' reach: a parameter whose gradient hook does not
    fire in the accumulation boundary's micro-batch loses what earlier micro-batches accumulated (ZeRO-2/3, a plan
    per micro-batch), and a pipeline engine applies an unread parameter's previous gradient again. Projecting
    every layer's K/V in every micro-batch (unread ones with weight zero: an exact zero gradient) avoids both."""
    optimizer = getattr(engine, "optimizer", None)
    return bool(getattr(optimizer, "cpu_offload", False) or getattr(optimizer, "offload_optimizer", False))


def clear_stale_gradients(engine: Any) -> None:
    """Zero DeepSpeed's persistent gradient buffers before a step's first micro-batch.

    A parameter that gets no gradient in a step (under R-CLA, the K/V projections of a layer no other layer
    reads) must count as zero, as plain ZeRO-1/2 count it. DeepSpeed 0.19 writes reduced gradients into buffers
    it never clears in three cases, which would apply the previous step's gradient again: ZeRO-3's flat
    partitions, and the CPU copies of ZeRO-1/2 and ZeRO-3 with offload_optimizer.
    """
    optimizer = getattr(engine, "optimizer", None)
    buffers = [getattr(optimizer, "grad_partitions_flat_buffer", None)]  # ZeRO-3 (None with offload)
    if getattr(optimizer, "cpu_offload", False):  # ZeRO-1/2 with offload
        buffers += [flat.grad for flat in optimizer.single_partition_of_fp32_groups]
    if getattr(optimizer, "offload_optimizer", False):  # ZeRO-3 with offload
        buffers += [flat.grad for flat in getattr(optimizer, "fp32_partitioned_groups_flat", [])]
    for buffer in buffers:
        if buffer is not None:
            buffer.zero_()


class DataParallelRunner:
    def __init__(self, engine: Any, ctx: ParallelContext):
        self.engine, self.ctx = engine, ctx

    def _to_device(self, batch: MicroBatch) -> MicroBatch:
        return batch[0].to(self.ctx.device), batch[1].to(self.ctx.device)

    def learning_rate(self) -> float:
        return float(self.engine.get_lr()[0])

    def train_step(self, micro_batches: Sequence[MicroBatch], plans: Sequence[RoutingPlan],
                   tokens_per_micro_batch: float | None = None, poison: bool = False) -> StepResult:
        engine = self.engine
        engine.train()
        clear_stale_gradients(engine)
        loss_sum = 0.0
        layout = self.ctx.layout
        mine = rank_plans(plans, layout.data_rank, layout.data_parallel)
        keep = kept_kv(plans, layout.data_parallel, every_layer=offloads_optimizer(engine))
        for index, batch in enumerate(micro_batches):
            inputs, labels = self._to_device(batch)
            loss = causal_lm_loss(engine(inputs, plan=mine[index % len(mine)], keep_kv=keep[index % len(keep)]),
                                  labels, tokens_per_micro_batch)
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
        engine = self.engine
        engine.eval()
        total, counted = 0.0, 0.0
        for index, batch in enumerate(micro_batches):
            w = _weights_of(weights, index, len(batch[0]))
            counted += weighted_label_count(batch[1], w)
            inputs, labels = self._to_device(batch)
            total += float(weighted_token_loss(engine(inputs, plan=plan), labels, w.to(self.ctx.device)))
        engine.train()
        return total, counted


class PipelineLoss:
    """The last stage's loss: training cross-entropy, or validation's weighted sum when labels carry weights."""

    def __init__(self) -> None:
        self.poison = False
        self.tokens_per_micro_batch: float | None = None  # the step's, set for the length of train_batch

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        if isinstance(labels, (tuple, list)):
            return weighted_token_loss(logits, labels[0], labels[1])
        loss = causal_lm_loss(logits, labels, self.tokens_per_micro_batch)
        return loss * float("nan") if self.poison else loss


class PipelineRunner:
    def __init__(self, engine: Any, ctx: ParallelContext, loss: PipelineLoss):
        self.engine, self.ctx, self.loss = engine, ctx, loss

    def learning_rate(self) -> float:
        return float(self.engine.get_lr()[0])

    def _feed(self, micro_batches: Sequence[MicroBatch], plans: Sequence[RoutingPlan],
              keep: Sequence[frozenset[int]], labels_of):
        from megakv.parallel.pipeline import plan_tensor

        for index, (inputs, labels) in enumerate(micro_batches):
            plan = plan_tensor(plans[index % len(plans)], keep[index % len(keep)])
            yield (inputs, plan), labels_of(index, labels)

    def train_step(self, micro_batches: Sequence[MicroBatch], plans: Sequence[RoutingPlan],
                   tokens_per_micro_batch: float | None = None, poison: bool = False) -> StepResult:
        engine = self.engine
        layout = self.ctx.layout
        mine = rank_plans(plans, layout.data_rank, layout.data_parallel)
        keep = kept_kv(plans, layout.data_parallel, every_layer=offloads_optimizer(engine))
        self.loss.poison, self.loss.tokens_per_micro_batch = poison, tokens_per_micro_batch
        try:
            engine.train_batch(data_iter=self._feed(micro_batches, mine, keep, lambda _, labels: labels))
        finally:
            self.loss.poison, self.loss.tokens_per_micro_batch = False, None
        # dp_group_loss: this replica's mean over its micro-batches, broadcast to every stage.
        replica_mean = float(engine.dp_group_loss)
        norm = engine.get_global_grad_norm()
        norm = None if norm is None else float(norm)
        return StepResult(replica_mean * len(micro_batches), len(micro_batches), bool(engine.was_step_applied()),
                          norm)

    def eval_loss(self, micro_batches: Sequence[MicroBatch], weights: Sequence[float],
                  plan: RoutingPlan) -> tuple[float, float]:
        """Like DataParallelRunner.eval_loss; every stage of a replica returns the same figures."""
        if not micro_batches:
            return 0.0, 0.0
        size = len(micro_batches[0][0])

        def with_weights(index: int, labels: torch.Tensor):
            return labels, _weights_of(weights, index, size)

        # eval_batch averages the per-micro-batch sums over micro-batches and data-parallel ranks; scaled
        # back by the micro-batch count it is this replica's share of the global sum.
        mean = self.engine.eval_batch(iter(list(self._feed(micro_batches, [plan], [frozenset()], with_weights))),
                                      num_micro_batches=len(micro_batches))
        self.engine.module.train()
        counted = sum(weighted_label_count(labels, _weights_of(weights, index, size))
                      for index, (_, labels) in enumerate(micro_batches))
        return float(mean) * len(micro_batches), counted
