"""Dense MegaKVModel weights from a tensor-parallel (TP x DP) run's checkpoint, with no process group.

With the layout's grid as mpu, DeepSpeed writes per tensor rank t `mp_rank_TT_model_states.pt` (the shard's
module weights in the training precision, under MegaKVModel names, written by data rank 0) and, per data
rank d, `[bf16_]zero_pp_rank_D_mp_rank_TT_optim_states.pt` (that rank's part of the flat fp32 masters).
DeepSpeed's zero_to_fp32 reads mp_rank_00 only, so megakv reads every tensor rank itself and merges:
  fp32 runs: the module weights are the masters (ZeRO 1/2 copy the updated fp32 partitions back);
  bf16 runs: the fp32 masters are rebuilt from the flat partitions in the order of `param_shapes`.
Every file is read with the weights-only loader (DeepSpeed's and numpy's globals allowed), never unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megakv.config.model import ModelConfig
from megakv.parallel.deepspeed_files import OPTIM_FILE, load_deepspeed_file
from megakv.parallel.tensor_split import merge_state_dicts, tensor_split


def _model_states(tag_dir: Path, tensor_rank: int) -> dict:
    path = tag_dir / f"mp_rank_{tensor_rank:02d}_model_states.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: a checkpoint of a run with parallel.tensor > {tensor_rank} "
                                "has one mp_rank_XX_model_states.pt per tensor rank; restore the file or export "
                                "an earlier complete checkpoint")
    return load_deepspeed_file(path)


def _parameter_names(states: dict) -> list[str]:
    """The names zero_to_fp32 would give: trainable parameters, buffers, then tied (shared) names."""
    names = [name for group in states["param_shapes"] for name in group]
    names += list(states.get("buffer_names") or [])
    names += [alias for alias, source in (states.get("shared_params") or {}).items() if source in names]
    return names


def _masters(tag_dir: Path, tensor_rank: int, states: dict) -> dict[str, torch.Tensor]:
    """This tensor rank's fp32 masters: its data ranks' flat partitions, concatenated per parameter group."""
    paths = {}
    for path in tag_dir.iterdir():
        match = OPTIM_FILE.match(path.name)
        if match and int(match.group(2)) == tensor_rank:
            paths[int(match.group(1))] = path
    if sorted(paths) != list(range(len(paths))) or not paths:
        raise FileNotFoundError(f"{tag_dir}: the optimizer partitions of tensor rank {tensor_rank} are incomplete "
                                f"(data ranks found: {sorted(paths)})")
    parts = [load_deepspeed_file(paths[d])["optimizer_state_dict"]["single_partition_of_fp32_groups"]
             for d in sorted(paths)]
    weights = {}
    for group, shapes in enumerate(states["param_shapes"]):
        flat = torch.cat([part[group] for part in parts])
        offset = 0
        for name, shape in shapes.items():  # parameters lie back to back; only the group's end is padded
            count = shape.numel()
            weights[name] = flat[offset:offset + count].view(shape).clone()
            offset += count
    for alias, source in (states.get("shared_params") or {}).items():
        if source in weights:
            weights[alias] = weights[source]
    return weights


def tensor_shards(tag_dir: str | Path, tensor: int, masters: bool) -> list[dict[str, torch.Tensor]]:
    """Every tensor rank's fp32 shard in rank order: module weights, or the optimizer's masters (bf16 runs)."""
    tag_dir = Path(tag_dir)
    shards = []
    for rank in range(tensor):
        states = _model_states(tag_dir, rank)
        if masters:
            shards.append(_masters(tag_dir, rank, states))
        else:
            module = states["module"]
            shards.append({name: module[name].float() for name in _parameter_names(states)})
    return shards


def tensor_checkpoint_state(tag_dir: str | Path, cfg: ModelConfig, tensor: int,
                            masters: bool = False) -> dict[str, torch.Tensor]:
    """The dense fp32 state dict (MegaKVModel names) of a TP checkpoint: the shards merged exactly."""
    return merge_state_dicts(tensor_shards(tag_dir, tensor, masters), tensor_split(cfg, tensor))
