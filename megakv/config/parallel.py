"""Parallel layout and ZeRO (the `parallel:` section). The data-parallel size is inferred from the world size."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megakv.config.errors import ConfigError

OFFLOAD_TARGETS = ("none", "cpu")
BACKENDS = ("auto", "nccl", "gloo")
PIPELINE_PARTITIONS = ("uniform", "parameters")
PIPELINE_TRANSPORTS = ("fixed", "dynamic")


def check_tensor_zero_stage(zero_stage: int, tensor: int, field: str = "parallel.zero_stage") -> None:
    if tensor > 1 and zero_stage > 2:
        raise ConfigError(field, zero_stage, "ZeRO-3 is not supported with tensor parallelism (it would partition "
                          "the tensor shards again; untested with megakv's tensor-group gradient hooks)",
                          "use parallel.zero_stage=1 or 2 with parallel.tensor > 1")


@dataclass
class ParallelConfig:
    tensor: int = 1  # head-split tensor parallelism (megakv/parallel/tensor.py; ZeRO 1-2, inside pipeline stages)
    pipeline: int = 1  # pipeline stages (DeepSpeed's pipe engine; needs zero_stage 1)
    # How blocks are cut into stages: uniform (same number of blocks per stage; n_layers must divide) or
    # parameters (balance parameter counts, the embedding counted on the first stage, the head on the last).
    pipeline_partition: str = "uniform"
    # How K/V cross a stage boundary: fixed (padded to the most that can cross, constant shapes) or
    # dynamic (exactly what this micro-batch's plan needs; metadata with every send).
    pipeline_transport: str = "fixed"
    zero_stage: int = 2  # DeepSpeed ZeRO stage 1, 2 or 3
    offload_optimizer: str = "none"  # none | cpu (ZeRO-Offload of optimizer state; stage >= 1)
    # A readable DeepSpeed JSON fragment (ds_configs/<name>.json, or a path) adding tuning keys (buckets,
    # overlap, prefetch). Keys the typed config owns must agree with it, or the launch is refused.
    ds_fragment: str | None = None
    backend: str = "auto"  # auto: nccl on GPUs, gloo on CPU
    # DeepSpeed's shared-memory CPU allreduce op JIT-compiles (~80 s) on first use; off by default on CPU.
    cpu_shm_comm: bool = False
    # Seconds a rank waits for its peers (rendezvous, launch checks, every collective) before giving up: a
    # rank that died or froze ends the others after this long. Must exceed the longest one-rank pause (a
    # checkpoint save, building the data index on rank 0).
    timeout: float = 600.0

    def validate(self, prefix: str = "parallel") -> None:
        def need(ok: bool, name: str, problem: str, fix: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), problem, fix)

        need(self.tensor >= 1, "tensor", "must be >= 1", "1 disables tensor parallelism")
        need(self.pipeline >= 1, "pipeline", "must be >= 1", "1 disables pipeline parallelism")
        need(self.zero_stage in (1, 2, 3), "zero_stage", "expected ZeRO stage 1, 2 or 3",
             "1 shards optimizer state, 2 also gradients, 3 also parameters")
        need(self.offload_optimizer in OFFLOAD_TARGETS, "offload_optimizer", f"expected one of {OFFLOAD_TARGETS}",
             "use none or cpu")
        need(self.backend in BACKENDS, "backend", f"expected one of {BACKENDS}", "use auto")
        need(math.isfinite(self.timeout) and self.timeout > 0, "timeout", "must be a positive number of seconds",
             "e.g. 600 (10 minutes); longer than the slowest checkpoint save")
        need(self.pipeline_partition in PIPELINE_PARTITIONS, "pipeline_partition",
             f"expected one of {PIPELINE_PARTITIONS}", "uniform, or parameters to balance parameter counts")
        need(self.pipeline_transport in PIPELINE_TRANSPORTS, "pipeline_transport",
             f"expected one of {PIPELINE_TRANSPORTS}", "fixed (constant shapes) or dynamic")

    def validate_layout(self, world_size: int, prefix: str = "parallel") -> int:
        """Checks that the layout fits `world_size` ranks; returns the data-parallel size."""
        model_parallel = self.tensor * self.pipeline
        if world_size % model_parallel:
            raise ConfigError(f"{prefix}.pipeline" if self.tensor == 1 else f"{prefix}.tensor",
                              self.pipeline if self.tensor == 1 else self.tensor,
                              f"world size {world_size} is not a multiple of tensor x pipeline = {model_parallel}",
                              f"launch {model_parallel} processes or a multiple of {model_parallel} (nodes x "
                              "GPUS_PER_NODE with slurm/pretrain.sbatch, or torchrun --nproc_per_node), or lower "
                              "parallel.tensor / parallel.pipeline")
        if self.pipeline > 1 and self.zero_stage > 1:
            raise ConfigError(f"{prefix}.zero_stage", self.zero_stage,
                              "DeepSpeed's pipeline engine supports ZeRO stage 1 at most",
                              "use parallel.zero_stage=1 with pipeline parallelism")
        check_tensor_zero_stage(self.zero_stage, self.tensor, f"{prefix}.zero_stage")
        return world_size // model_parallel
