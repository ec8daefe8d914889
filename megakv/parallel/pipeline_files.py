"""MegaKVModel weights from a pipeline run's checkpoint (no process group needed).

DeepSpeed's pipeline checkpoints hold, per spec index, `layer_XX-model_TT-model_states.pt` (the module
weights in the training precision, written by data rank 0; a tied head is saved once, with the
embedding) and, per stage and data rank, the optimizer's flat fp32 partitions. DeepSpeed's zero_to_fp32
does not read pipeline checkpoints, so megakv maps names itself (pipeline.dense_name).
  fp32 runs: the layer files hold the exact weights.
  bf16 runs: the fp32 master weights are rebuilt from the flat partitions, in the order of the
             stage's `param_shapes`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from megakv.parallel.pipeline import dense_name
from megakv.safe_load import deepspeed_globals, load_weights_only, numpy_globals

LAYER_FILE = re.compile(r"^layer_(\d+)-model_(\d+)-model_states\.pt$")
STAGE_FILE = re.compile(r"^mp_rank_(\d+)_model_states\.pt$")
OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt$")


def layer_files_state(tag_dir: Path, n_layers: int) -> dict[str, torch.Tensor]:
    """Weights as the layer files hold them (tensor rank 0), under MegaKVModel names."""
    state: dict[str, torch.Tensor] = {}
    files = sorted(p for p in Path(tag_dir).iterdir() if LAYER_FILE.match(p.name))
    if not files:
        raise FileNotFoundError(f"{tag_dir} has no layer_*-model_*-model_states.pt files: not a pipeline checkpoint")
    for path in files:
        index, tensor_rank = (int(g) for g in LAYER_FILE.match(path.name).groups())
        if tensor_rank != 0:
            raise NotImplementedError(f"{path.name}: merging tensor-parallel layer files is not supported")
        for key, tensor in torch.load(path, map_location="cpu", weights_only=True).items():
            state[dense_name(f"{index}.{key}", n_layers)] = tensor
    return state


def _load(path: Path):
    return load_weights_only(path, deepspeed_globals() + numpy_globals())


def master_weights_state(tag_dir: Path, n_layers: int) -> dict[str, torch.Tensor]:
    """fp32 master weights from the optimizer partitions of every stage and data rank.

    DeepSpeed's pickles are read by the weights-only unpickler (the globals DeepSpeed stores, nothing else).
    """
    tag_dir = Path(tag_dir)
    shards: dict[int, dict[int, Path]] = {}
    for path in tag_dir.iterdir():
        match = OPTIM_FILE.match(path.name)
        if match:
            data_rank, stage = int(match.group(1)), int(match.group(2))
            shards.setdefault(stage, {})[data_rank] = path
    state: dict[str, torch.Tensor] = {}
    for stage_file in sorted(p for p in tag_dir.iterdir() if STAGE_FILE.match(p.name)):
        stage = int(STAGE_FILE.match(stage_file.name).group(1))
        shapes = _load(stage_file)["param_shapes"]
        parts = [_load(shards[stage][r])["optimizer_state_dict"]
                 ["single_partition_of_fp32_groups"] for r in sorted(shards[stage])]
        for group, names in enumerate(shapes):
            flat = torch.cat([p[group] for p in parts])
            offset = 0
            for name, shape in names.items():
                count = shape.numel()
                state[dense_name(name, n_layers)] = flat[offset:offset + count].view(shape).clone()
                offset += count
    return state
