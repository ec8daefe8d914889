"""MegaKVModel weights from a pipeline run's checkpoint (no process group needed).

DeepSpeed's pipeline checkpoints hold, per spec index, `layer_XX-model_TT-model_states.pt` (the module
weights in the training precision, written by data rank 0; a tied head is saved once, with the
embedding) and, per stage and data rank, the optimizer's flat fp32 partitions. DeepSpeed's zero_to_fp32
does not read pipeline checkpoints, so megakv maps names itself (pipeline.dense_name).
  fp32 runs: the layer files hold the exact weights.
  bf16 runs: the fp32 master weights are rebuilt from the flat partitions, in the order of the
             stage's `param_shapes`.
With tensor parallelism inside the stages (TP x PP) each layer has one file per tensor rank TT, and the
optimizer files of stage s and tensor rank t are `mp_rank_{s * T + t}` (DeepSpeed's model-parallel rank
counts over the stages and tensor ranks of a replica); every tensor rank's shard is merged
(tensor_split.merge_state_dicts), so the result is the dense model's state dict whatever the layout.
Every file is read with the weights-only loader (deepspeed_files.load_deepspeed_file), never unpickled.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megakv.parallel.deepspeed_files import LAYER_FILE, OPTIM_FILE, STAGE_FILE, load_deepspeed_file
from megakv.parallel.pipeline import dense_name
from megakv.parallel.tensor_split import TensorSplit, merge_state_dicts


def _merged(shards: list[dict[str, torch.Tensor]], split: TensorSplit | None) -> dict[str, torch.Tensor]:
    return shards[0] if split is None or split.tensor == 1 else merge_state_dicts(shards, split)


def layer_files_state(tag_dir: Path, n_layers: int, split: TensorSplit | None = None) -> dict[str, torch.Tensor]:
    """Weights as the layer files hold them, under MegaKVModel names; `split`: the run's tensor split
    (None: no tensor parallelism), whose shards are merged."""
    tensor = 1 if split is None else split.tensor
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tensor)]
    files = sorted(p for p in Path(tag_dir).iterdir() if LAYER_FILE.match(p.name))
    if not files:
        raise FileNotFoundError(f"{tag_dir} has no layer_*-model_*-model_states.pt files: not a pipeline checkpoint")
    per_layer: dict[int, set[int]] = {}
    for path in files:
        index, tensor_rank = (int(g) for g in LAYER_FILE.match(path.name).groups())
        if tensor_rank >= tensor:
            raise ValueError(f"{path}: a file of tensor rank {tensor_rank}, but the run's parallel.tensor is {tensor}")
        per_layer.setdefault(index, set()).add(tensor_rank)
        for key, value in load_deepspeed_file(path).items():
            shards[tensor_rank][dense_name(f"{index}.{key}", n_layers)] = value
    for index, ranks in per_layer.items():
        if ranks != set(range(tensor)):
            raise FileNotFoundError(f"{tag_dir}: layer {index} has files of tensor ranks {sorted(ranks)}, expected "
                                    f"0..{tensor - 1}; restore the missing layer_{index:02d}-model_XX file")
    return _merged(shards, split)


def master_weights_state(tag_dir: Path, n_layers: int, split: TensorSplit | None = None) -> dict[str, torch.Tensor]:
    """fp32 master weights from the optimizer partitions of every stage, tensor and data rank."""
    tag_dir = Path(tag_dir)
    tensor = 1 if split is None else split.tensor
    partitions: dict[int, dict[int, Path]] = {}
    for path in tag_dir.iterdir():
        match = OPTIM_FILE.match(path.name)
        if match:
            data_rank, model_rank = int(match.group(1)), int(match.group(2))
            partitions.setdefault(model_rank, {})[data_rank] = path
    shards: list[dict[str, torch.Tensor]] = [{} for _ in range(tensor)]
    for stage_file in sorted(p for p in tag_dir.iterdir() if STAGE_FILE.match(p.name)):
        model_rank = int(STAGE_FILE.match(stage_file.name).group(1))
        shapes = load_deepspeed_file(stage_file)["param_shapes"]
        parts = [load_deepspeed_file(partitions[model_rank][r])["optimizer_state_dict"]
                 ["single_partition_of_fp32_groups"] for r in sorted(partitions[model_rank])]
        shard = shards[model_rank % tensor]
        for group, names in enumerate(shapes):
            flat = torch.cat([p[group] for p in parts])
            offset = 0
            for name, shape in names.items():
                count = shape.numel()
                shard[dense_name(name, n_layers)] = flat[offset:offset + count].view(shape).clone()
                offset += count
    return _merged(shards, split)
