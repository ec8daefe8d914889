"""A rank that leaves a shared config mistake to rank 0 waits until rank 0 has said it.

Under torchrun the first rank to exit with an error gets every other rank stopped, so a quiet rank that
exited at once (or after a fixed sleep, on a loaded machine) silenced rank 0's message. Two real processes
meet on a real env:// store; rank 0 is made slow on purpose.
"""

from __future__ import annotations

import os
import time

import pytest
import torch.multiprocessing as mp
from train_helpers import free_port

pytestmark = pytest.mark.distributed

RANK0_DELAY_S = 2.0


def _worker(rank: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    from megakv.train.launch_guard import LaunchGuard

    guard = LaunchGuard.connect(timeout_s=30)
    if rank == 0:
        time.sleep(RANK0_DELAY_S)  # rank 0 still importing and validating
        said_at = time.monotonic()
        guard.report("the shared mistake", 2, said=True)
        queue.put((rank, said_at, None))
    else:
        guard.report("the shared mistake", 2, said=False)
        heard = guard.wait_until_said(0)
        queue.put((rank, time.monotonic(), heard))


def test_the_quiet_rank_waits_for_rank_zero_to_say_it():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    mp.start_processes(_worker, args=(free_port(), queue), nprocs=2, join=True, start_method="spawn")
    results = {rank: (at, heard) for rank, at, heard in (queue.get(timeout=30) for _ in range(2))}
    said_at, (left_at, heard) = results[0][0], results[1]
    assert heard is True and left_at >= said_at  # it left only once rank 0 had said it


def test_a_rank_zero_that_never_says_it_ends_the_wait_after_the_timeout():
    from datetime import timedelta

    import torch.distributed as dist

    from megakv.train.launch_guard import LaunchGuard

    store = dist.TCPStore("127.0.0.1", free_port(), 1, is_master=True, timeout=timedelta(seconds=5))
    guard = LaunchGuard(store, rank=1, world_size=2, timeout_s=1.0)
    started = time.monotonic()
    assert guard.wait_until_said(0) is False and 1.0 <= time.monotonic() - started < 5
    LaunchGuard(store, rank=0, world_size=2, timeout_s=1.0).mark_said()
    assert guard.wait_until_said(0) is True
