"""Which slice of every weight a tensor-parallel rank holds: pure arithmetic, no process groups.

Megatron's split of a Llama-style block over T tensor ranks: q/k/v and gate/up are split by output rows
(column-parallel), o/down by input columns (row-parallel); everything else (embedding, head, norms, the
row-parallel biases) is replicated. Attention heads are split whole: rank r holds query heads
[r*H/T, (r+1)*H/T) and the K/V heads those queries read. With fewer K/V heads than ranks (n_kv_heads < T,
T % n_kv_heads == 0) each K/V head is replicated on the T/n_kv_heads consecutive ranks whose queries read it.

`tensor_split` validates a model against a tensor degree (a ConfigError naming the field and the degrees
that would work) and runs at launch before any process group exists. `shard_tensor` slices one dense
parameter to a rank's shard and `merge_state_dicts` joins every rank's shards back into the dense MegaKVModel
state dict, exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from megakv.config.errors import ConfigError
from megakv.config.model import ModelConfig

# Parameter-name suffix -> (which rows/columns are split, the split dim). The rest is replicated.
SPLIT_PARAMETERS: dict[str, tuple[str, int]] = {
    "attn.q_proj.weight": ("q", 0), "attn.q_proj.bias": ("q", 0),
    "attn.k_proj.weight": ("kv", 0), "attn.k_proj.bias": ("kv", 0),
    "attn.v_proj.weight": ("kv", 0), "attn.v_proj.bias": ("kv", 0),
    "attn.o_proj.weight": ("q", 1),
    "mlp.gate_proj.weight": ("ffn", 0), "mlp.up_proj.weight": ("ffn", 0),
    "mlp.down_proj.weight": ("ffn", 1),
}


def split_of(name: str) -> tuple[str, int] | None:
    """(part, dim) for a split parameter of a MegaKVModel state dict, None for a replicated one."""
    for suffix, split in SPLIT_PARAMETERS.items():
        if name.endswith("." + suffix):
            return split
    return None


@dataclass(frozen=True)
class TensorSplit:
    """Head and width counts per tensor rank for one model and tensor degree (see `tensor_split`)."""

    tensor: int
    head_dim: int
    heads_per_rank: int
    kv_heads_per_rank: int
    kv_replicas: int  # ranks holding the same K/V heads: 1 when K/V heads are split, T/n_kv_heads otherwise
    ffn_per_rank: int

    def kv_group(self, rank: int) -> int:
        """Index of the K/V slice rank `rank` holds; ranks with the same index hold replicas."""
        return rank // self.kv_replicas

    @property
    def kv_groups(self) -> int:
        return self.tensor // self.kv_replicas

    def is_first_kv_replica(self, rank: int) -> bool:
        return rank % self.kv_replicas == 0

    def rows(self, part: str, rank: int) -> slice:
        """The slice of the dense dimension that `part` (q, kv or ffn) splits, held by `rank`."""
        if part == "q":
            width, index = self.heads_per_rank * self.head_dim, rank
        elif part == "kv":
            width, index = self.kv_heads_per_rank * self.head_dim, self.kv_group(rank)
        elif part == "ffn":
            width, index = self.ffn_per_rank, rank
        else:
            raise ValueError(f"unknown split part {part!r}")
        return slice(index * width, (index + 1) * width)


def _problems(cfg: ModelConfig, tensor: int) -> list[str]:
    problems = []
    if cfg.n_heads % tensor:
        problems.append(f"model.n_heads={cfg.n_heads} is not divisible by it")
    if cfg.n_kv_heads % tensor and (cfg.n_kv_heads > tensor or tensor % cfg.n_kv_heads):
        problems.append(f"model.n_kv_heads={cfg.n_kv_heads} neither divides by it nor divides it "
                        "(K/V heads are split, or replicated when there are fewer than tensor ranks)")
    if cfg.ffn_hidden % tensor:
        problems.append(f"model.ffn_hidden={cfg.ffn_hidden} is not divisible by it")
    return problems


def valid_tensor_degrees(cfg: ModelConfig) -> list[int]:
    return [t for t in range(1, cfg.n_heads + 1) if not _problems(cfg, t)]


def tensor_split(cfg: ModelConfig, tensor: int, field: str = "parallel.tensor") -> TensorSplit:
    """The split of `cfg` over `tensor` ranks, or a ConfigError naming `field` and the degrees that work."""
    if tensor < 1:
        raise ConfigError(field, tensor, "must be >= 1", "1 disables tensor parallelism")
    problems = _problems(cfg, tensor)
    if problems:
        raise ConfigError(field, tensor, "cannot split this model's heads and MLP: " + "; ".join(problems),
                          f"use a tensor degree that fits the model, one of {valid_tensor_degrees(cfg)}")
    kv_replicas = max(1, tensor // cfg.n_kv_heads)
    return TensorSplit(tensor=tensor, head_dim=cfg.resolved_head_dim, heads_per_rank=cfg.n_heads // tensor,
                       kv_heads_per_rank=max(1, cfg.n_kv_heads // tensor), kv_replicas=kv_replicas,
                       ffn_per_rank=cfg.ffn_hidden // tensor)


def shard_tensor(name: str, value: torch.Tensor, split: TensorSplit, rank: int) -> torch.Tensor:
    """Rank `rank`'s slice of the dense parameter `name` (a copy; the whole tensor if replicated)."""
    where = split_of(name)
    if where is None:
        return value.clone()
    part, dim = where
    rows = split.rows(part, rank)
    return value.narrow(dim, rows.start, rows.stop - rows.start).clone()


def merge_state_dicts(shards: Sequence[Mapping[str, torch.Tensor]], split: TensorSplit) -> dict[str, torch.Tensor]:
    """The dense state dict from every tensor rank's shard (in rank order), e.g. for export.

    Split parameters are concatenated (one copy per K/V replica group); replicated ones must be bitwise
    equal on every rank, and a divergence is an error rather than a silent pick of rank 0.
    """
    if len(shards) != split.tensor:
        raise ValueError(f"got {len(shards)} shards for tensor degree {split.tensor}")
    names = list(shards[0])
    for rank, shard in enumerate(shards[1:], start=1):
        if list(shard) != names:
            raise ValueError(f"tensor rank {rank}'s state dict has other parameters than rank 0's")
    merged = {}
    for name in names:
        values = [shard[name] for shard in shards]
        where = split_of(name)
        if where is None:
            for rank, value in enumerate(values[1:], start=1):
                if not torch.equal(value, values[0]):
                    raise ValueError(f"replicated parameter {name} differs between tensor ranks 0 and {rank}")
            merged[name] = values[0].clone()
            continue
        part, dim = where
        if part == "kv" and split.kv_replicas > 1:
            for rank, value in enumerate(values):
                first = split.kv_group(rank) * split.kv_replicas
                if not torch.equal(value, values[first]):
                    raise ValueError(f"K/V replica {name} differs between tensor ranks {first} and {rank}")
            values = values[::split.kv_replicas]
        merged[name] = torch.cat(values, dim=dim)
    return merged
