"""Communication smoke test for a launch setup: every rank joins the process group, all-reduces, and reports where it
runs. Use it in place of the trainer to check a cluster's launch and network before a real run:

    MEGAKV_TRAIN=megakv/testing/allreduce_check.py sbatch --nodes=2 slurm/pretrain.sbatch unused.yaml

Arguments are ignored (the sbatch script passes the trainer's). NCCL on GPUs, gloo on CPU. Exit status 0 only if
the sum is right on every rank and the ranks span as many nodes as SLURM allocated (when run under SLURM).
"""

from __future__ import annotations

import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist


def main() -> int:
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda") if use_cuda else torch.device("cpu")

    value = torch.tensor([float(rank)], device=device)
    dist.all_reduce(value)
    expected = world * (world - 1) / 2
    where = {"rank": rank, "node": os.environ.get("SLURM_NODEID", "?"), "host": socket.gethostname()}
    placements: list[dict[str, str] | None] = [None] * world
    dist.all_gather_object(placements, where)

    ok = value.item() == expected
    print(f"[rank {rank}/{world}] node={where['node']} host={where['host']} all_reduce={value.item():g} "
          f"expected={expected:g} {'ok' if ok else 'WRONG'}", flush=True)
    nodes = sorted({p["node"] for p in placements if p})
    if rank == 0:
        print(f"[rank 0] ranks span nodes {','.join(nodes)}", flush=True)
    if "SLURM_NNODES" in os.environ and len(nodes) != int(os.environ["SLURM_NNODES"]):
        print(f"[rank {rank}] expected ranks on {os.environ['SLURM_NNODES']} nodes, got {nodes}", file=sys.stderr)
        ok = False
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
