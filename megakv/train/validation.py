"""Validation loss under deployment plans (every:k keeps layers 0, k, 2k, ...: about 1/k of the cache).

The first `samples` validation sequences are spread over the data-parallel ranks. Ranks run the same
number of micro-batches (ZeRO-3 gathers parameters collectively in every forward), padding with
weight-0 repeats, so the result does not depend on the number of ranks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from megakv.data.sft import inputs_and_labels
from megakv.parallel.context import ParallelContext
from megakv.parallel.runners import MicroBatch, StepRunner
from megakv.routing import RoutingPlan


def validation_batches(valid, samples: int, micro_batch: int, dp_rank: int,
                       dp_size: int) -> tuple[list[MicroBatch], list[float]]:
    count = 0 if valid is None else min(samples, len(valid))
    if count == 0:
        return [], []
    per_round = micro_batch * dp_size
    total = math.ceil(count / per_round) * per_round
    mine = list(range(dp_rank, total, dp_size))
    weights = [1.0 if g < count else 0.0 for g in mine]
    rows = np.stack([np.asarray(valid[g % count], dtype=np.int64) for g in mine])
    tokens = torch.from_numpy(rows)
    batches = [inputs_and_labels(tokens[i:i + micro_batch]) for i in range(0, len(mine), micro_batch)]
    return batches, weights


def validation_losses(runner: StepRunner, batches: list[MicroBatch], weights: list[float],
                      plans: dict[str, RoutingPlan], ctx: ParallelContext) -> dict[str, float]:
    """Loss per plan over all data-parallel ranks (each replica's stages report the same sums)."""
    out = {}
    for name, plan in plans.items():
        total, weight = runner.eval_loss(batches, weights, plan)
        sums = torch.tensor([total, weight], dtype=torch.float64, device=ctx.device)
        ctx.all_reduce(sums, ctx.data_group)
        out[name] = float(sums[0] / sums[1]) if sums[1] > 0 else float("nan")
    return out
