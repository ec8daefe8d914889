"""Where this process sits in the parallel layout, computed from the launcher's environment alone.

Known before any process group exists, so every launch-time check (batch sizes, ZeRO stage, resuming on
another data-parallel size) runs first. Rank order is Megatron's: tensor fastest, then data, then pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from megakv.config.parallel import ParallelConfig


@dataclass(frozen=True)
class ParallelLayout:
    world_size: int
    rank: int
    local_rank: int
    tensor: int = 1
    pipeline: int = 1

    @property
    def model_parallel(self) -> int:
        return self.tensor * self.pipeline

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.model_parallel

    @property
    def tensor_rank(self) -> int:
        return self.rank % self.tensor

    @property
    def data_rank(self) -> int:
        return (self.rank // self.tensor) % self.data_parallel

    @property
    def pipeline_rank(self) -> int:
        return self.rank // (self.tensor * self.data_parallel)

    @property
    def holds_loss(self) -> bool:
        """The one rank that reports the loss: last pipeline stage, first tensor and data rank."""
        return self.pipeline_rank == self.pipeline - 1 and self.tensor_rank == 0 and self.data_rank == 0

    def describe(self) -> dict:
        return {**asdict(self), "data_parallel": self.data_parallel}

    @classmethod
    def from_env(cls, cfg: ParallelConfig, env: Mapping[str, str] | None = None) -> ParallelLayout:
        """torchrun and the deepspeed launcher set WORLD_SIZE/RANK/LOCAL_RANK; a bare process is rank 0 of 1."""
        env = os.environ if env is None else env
        tasks = int(env.get("SLURM_STEP_NUM_TASKS", "1") or "1")
        if "WORLD_SIZE" not in env and tasks > 1:  # `srun megakv-train`: N separate one-process runs otherwise
            raise ValueError(f"this process is one of {tasks} SLURM tasks but no launcher set WORLD_SIZE/RANK, so "
                             f"each task would train alone, all into one run directory. Fix: submit "
                             "slurm/pretrain.sbatch (one torchrun per node starts the ranks), or run one task per "
                             "node that starts torchrun")
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local_rank = int(env.get("LOCAL_RANK", "0"))
        if not 0 <= rank < world:
            raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world}: check the launcher's environment")
        return cls(world, rank, local_rank, cfg.tensor, cfg.pipeline)


def tensor_group_spread_warning(layout: ParallelLayout, env: Mapping[str, str] | None = None) -> str | None:
    """A warning when tensor groups span nodes: the launcher starts LOCAL_WORLD_SIZE processes per node
    and ranks are tensor-fastest, so unless that count is a multiple of parallel.tensor some groups hold
    ranks of two nodes and all-reduce over the network in every block (forward and backward)."""
    env = os.environ if env is None else env
    per_node = int(env.get("LOCAL_WORLD_SIZE", layout.world_size))
    if layout.tensor == 1 or per_node >= layout.world_size or per_node % layout.tensor == 0:
        return None
    return (f"parallel.tensor={layout.tensor} does not divide the {per_node} processes per node: some tensor groups "
            "span two nodes and all-reduce over the network in every block. Fix: launch a multiple of "
            f"parallel.tensor processes per node (GPUS_PER_NODE / --nproc-per-node), e.g. {layout.tensor}")
