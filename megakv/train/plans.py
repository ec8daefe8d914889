"""One routing plan per step (or per micro-batch), made on global rank 0 and broadcast to every rank.

Rank 0 samples from (seed, step, slot) only, so a resumed run draws the same plans; the broadcast makes
every rank (data-parallel replicas, tensor and pipeline peers) use exactly rank 0's plans even if some
rank's code or library versions differed.

With `routing.per_micro_batch` the slot is the *global* position of the micro-batch in the step: the
step covers samples [s*B, (s+1)*B) and slot m holds samples [m*micro_batch, (m+1)*micro_batch) of it.
A data-parallel rank's k-th micro-batch is slot data_rank * accumulation + k (the loader gives each
rank one contiguous slice; megakv/parallel/runners.py picks the rank's plans), so every layout of one
config pairs the same samples with the same plan and trains the same model. The rank-local
micro-batch index never decides a plan.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from megakv.config.routing import RoutingConfig
from megakv.routing import RoutingPlan, sample_plan


def plans_per_step(cfg: RoutingConfig, global_batch: int, micro_batch: int) -> int:
    """1, or with per-micro-batch plans one per global micro-batch slot of the step."""
    return global_batch // micro_batch if cfg.per_micro_batch else 1


def sample_step_plans(cfg: RoutingConfig, n_layers: int, step: int, count: int) -> list[RoutingPlan]:
    """Plans for slots 0..count-1 of `step` (slot = global micro-batch position, see the module doc)."""
    return [sample_plan(cfg.strategy, n_layers, q_cross=cfg.q_cross_at(step), seed=cfg.seed, step=step, micro_batch=m,
                        max_distance=cfg.max_distance) for m in range(count)]


def broadcast_step_plans(cfg: RoutingConfig, n_layers: int, step: int, count: int, rank: int,
                         device: torch.device) -> list[RoutingPlan]:
    """Rank 0 samples `count` plans for `step`; every rank returns rank 0's plans.

    The broadcast is over the whole world on purpose: data, tensor and pipeline peers all need them.
    """
    table = torch.empty(count, n_layers, dtype=torch.long, device=device)
    if rank == 0:
        plans = sample_step_plans(cfg, n_layers, step, count)
        table.copy_(torch.tensor([p.sources for p in plans], dtype=torch.long))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast(table, src=0)
    return [RoutingPlan(tuple(int(s) for s in row)) for row in table.cpu().tolist()]


class PlanDivergence(RuntimeError):
    pass


def check_plans_agree(plans: list[RoutingPlan], step: int, device: torch.device) -> None:
    """Debug check: all ranks hold identical plans (MIN == MAX elementwise over the world)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    mine = torch.tensor([p.sources for p in plans], dtype=torch.long, device=device)
    low, high = mine.clone(), mine.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if not torch.equal(low, high):
        raise PlanDivergence(f"routing plans differ across ranks at step {step}: this rank has "
                             f"{[str(p) for p in plans]}, elementwise min {low.tolist()}, max {high.tolist()}")
