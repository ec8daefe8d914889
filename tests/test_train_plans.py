"""Routing plans in training: rank 0's plans reach every rank; the debug check catches divergence.

Two plain gloo processes (torch.distributed only, no DeepSpeed), results returned through a queue.
"""

from __future__ import annotations

import os

import pytest
import torch.multiprocessing as mp
from train_helpers import free_port, parse_plan

from megakv.config import RoutingConfig
from megakv.train.plans import sample_step_plans

pytestmark = pytest.mark.distributed


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    from megakv.routing import RoutingPlan
    from megakv.train.plans import PlanDivergence, broadcast_step_plans, check_plans_agree

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    # A rank with another seed would sample other plans; the broadcast makes it use rank 0's.
    cfg = RoutingConfig(strategy="rcla", q_cross=0.5, seed=7 if rank == 0 else 99)
    plans = [str(p) for step in range(5) for p in broadcast_step_plans(cfg, 6, step, 2, rank, torch.device("cpu"))]
    check_plans_agree([parse_plan(p) for p in plans[:2]], 1, torch.device("cpu"))  # agree: no error
    diverged = None
    try:
        check_plans_agree([RoutingPlan.own(6) if rank else parse_plan("0 0 1 2 3 4")], 2, torch.device("cpu"))
    except PlanDivergence as e:
        diverged = str(e)
    queue.put((rank, plans, diverged))
    dist.barrier()
    dist.destroy_process_group()


def test_rank_zero_plans_reach_every_rank_and_divergence_is_loud():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(2, free_port(), queue), nprocs=2, join=True, start_method="spawn")
    results = {rank: (plans, diverged) for rank, plans, diverged in (queue.get(timeout=30) for _ in range(2))}
    expected = [str(p) for step in range(5)
                for p in sample_step_plans(RoutingConfig(strategy="rcla", q_cross=0.5, seed=7), 6, step, 2)]
    assert results[0][0] == results[1][0] == expected
    assert all(diverged and "differ across ranks at step 2" in diverged for _, diverged in results.values())
