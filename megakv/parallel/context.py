"""The process-group side of the layout: initialised once, then passed explicitly (no module globals).

The data, pipeline and tensor groups come from DeepSpeed's `PipeModelDataParallelTopology` (axes pipe,
data, model: tensor fastest, then data, then pipeline), the rank order of megakv/parallel/layout.py,
and are built once at start-up, even for a plain data-parallel run, so every collective names its group.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megakv.config.devices import device_type, gpu_index
from megakv.config.parallel import ParallelConfig
from megakv.parallel.layout import ParallelLayout


@dataclass(frozen=True)
class ParallelContext:
    layout: ParallelLayout
    device: torch.device
    backend: str
    topology: Any  # deepspeed PipeModelDataParallelTopology of the layout
    data_group: dist.ProcessGroup  # ranks holding the same model shard (same pipe stage and tensor rank)
    tensor_group: dist.ProcessGroup  # ranks splitting one layer's heads (same stage and data rank)
    pipeline_group: dist.ProcessGroup  # the stages of one model replica (same data and tensor rank)

    @property
    def rank(self) -> int:
        return self.layout.rank

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def is_global_zero(self) -> bool:
        return self.layout.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, group: dist.ProcessGroup, op=dist.ReduceOp.SUM) -> torch.Tensor:
        """In-place all-reduce over `group` (nothing to do on one process)."""
        if dist.get_world_size(group) > 1:
            dist.all_reduce(tensor, op=op, group=group)
        return tensor


def layout_topology(layout: ParallelLayout):
    """DeepSpeed's topology for the layout; its rank order must be megakv's (checked, not assumed)."""
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    topology = PipeModelDataParallelTopology(num_pp=layout.pipeline, num_mp=layout.tensor,
                                             num_dp=layout.data_parallel)
    coord = topology.get_coord(layout.rank)
    ours = (layout.pipeline_rank, layout.data_rank, layout.tensor_rank)
    if (coord.pipe, coord.data, coord.model) != ours:
        raise RuntimeError(f"DeepSpeed's topology puts rank {layout.rank} at {coord}, megakv's layout at "
                           f"(pipe, data, model) = {ours}")
    return topology


def _build_groups(topology, rank: int) -> dict[str, dist.ProcessGroup]:
    """One group per axis that this rank belongs to. Every rank creates every group in the same order."""
    mine = {}
    for axis, name in (("data", "data_group"), ("model", "tensor_group"), ("pipe", "pipeline_group")):
        for ranks in topology.get_axis_comm_lists(axis):
            group = dist.new_group(ranks=ranks)
            if rank in ranks:
                mine[name] = group
    return mine


def resolve_device(requested: str, local_rank: int) -> torch.device:
    if device_type(requested) == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but torch sees no GPU; use train.device=auto or cpu")
        torch.cuda.set_device(gpu_index(local_rank))
        return torch.device("cuda", gpu_index(local_rank))
    return torch.device("cpu")


def pin_deepspeed_to(requested: str) -> None:
    """A run on the CPU of a GPU node pins DeepSpeed to the CPU too (else its engine moves the model to the GPU).
    Call before DeepSpeed is imported: it reads DS_ACCELERATOR once."""
    if device_type(requested) == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """A bare `megakv-train` (no launcher) is rank 0 of 1; give env:// rendezvous what it needs."""
    if "WORLD_SIZE" in os.environ:
        return
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def init_parallel(layout: ParallelLayout, cfg: ParallelConfig, device: str = "auto") -> ParallelContext:
    """Start the process group (NCCL on GPUs, gloo on CPU unless configured) and describe it."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    _single_process_env()
    dev = resolve_device(device, layout.local_rank)
    if dev.type == "cpu" and not cfg.cpu_shm_comm:
        # Skip DeepSpeed's shared-memory allreduce op: building it JIT-compiles C++ for ~80 s.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if cfg.backend != "auto":
        backend = cfg.backend
    elif dev.type == "cuda":
        backend = get_accelerator().communication_backend_name()  # nccl
    else:
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)
    if dist.get_world_size() != layout.world_size or dist.get_rank() != layout.rank:
        raise RuntimeError(f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with the "
                           f"environment (rank {layout.rank} of {layout.world_size})")
    topology = layout_topology(layout)
    return ParallelContext(layout=layout, device=dev, backend=backend, topology=topology,
                           **_build_groups(topology, layout.rank))


def shutdown_parallel() -> None:
    """End the process group cleanly; without it gloo processes sometimes abort at interpreter exit."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
