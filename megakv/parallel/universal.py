"""Universal checkpoints that resume on any pipeline / data layout, named by MegaKVModel parameter names.

DeepSpeed's ds_to_universal writes one folder per parameter, `zero/<name>/{fp32,exp_avg,exp_avg_sq,step}.pt`,
named as the engine that saved them named its parameters, and its loader looks each parameter up by the
loading engine's own name. The two engines megakv builds name parameters differently: the pipe engine by
spec index ('3.block.attn.q_proj.weight', 'tied_modules.embed.embed.weight'), the dense one by MegaKVModel
names ('layers.2.attn.q_proj.weight', 'embed.weight'). Spec indices do not depend on the pipeline size,
the dense names do not depend on anything, so:
  conversion  renames a pipeline run's folders to MegaKVModel names and leaves one `mp_rank_00` file whose
              module state is the MegaKVModel state dict (what the dense engine loads strictly);
  loading     a pipe engine looks its parameters up under their MegaKVModel names. Its module weights come
              from the fp32 masters (DeepSpeed copies them into the module after the optimizer state), so
              the dense-named module state in `mp_rank_00` is not matched against its layers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from megakv.parallel.deepspeed_files import LAYER_FILE, OPTIM_FILE, STAGE_FILE, load_deepspeed_file
from megakv.parallel.pipeline import dense_name
from megakv.parallel.pipeline_files import layer_files_state

ZERO_DIR = "zero"
MODEL_STATES = "mp_rank_00_model_states.pt"
# A folder every converted checkpoint holds under MegaKVModel names (the embedding is never tied away).
NAMED_MARKER = "embed.weight"


SPLIT_DIMS_MARKER = "megakv_split_dims.json"  # the row-parallel tensors' cat_dim is megakv's split dimension


def is_layout_free(tag_dir: Path) -> bool:
    """True for a universal checkpoint in MegaKVModel names (one any layout can load)."""
    return (Path(tag_dir) / ZERO_DIR / NAMED_MARKER).is_dir()


def tensor_ready(tag_dir: Path) -> bool:
    """True when every split parameter records the dimension megakv splits it along (DeepSpeed's loader cuts
    a tensor-parallel shard along the file's cat_dim)."""
    return (Path(tag_dir) / ZERO_DIR / SPLIT_DIMS_MARKER).is_file()


def record_split_dims(universal_dir: Path) -> None:
    """Set cat_dim in each split parameter's files to megakv's split dimension (o_proj / down_proj: 1)."""
    import json

    from megakv.parallel.tensor_split import split_of

    zero = Path(universal_dir) / ZERO_DIR
    dims = {}
    for folder in sorted(p for p in zero.iterdir() if p.is_dir()):
        where = split_of(folder.name)
        if where is None:
            continue
        dims[folder.name] = where[1]
        for key in STATE_KEYS:
            path = folder / f"{key}.pt"
            saved = load_deepspeed_file(path)
            if not isinstance(saved, dict):  # a ZeRO-3 conversion stores bare tensors: no tensor-parallel cut
                return  # (tensor parallelism cannot train ZeRO-3), so the directory is not marked tensor-ready
            if saved.get("cat_dim", 0) != where[1]:
                saved["cat_dim"] = where[1]
                torch.save(saved, path)
    (zero / SPLIT_DIMS_MARKER).write_text(json.dumps(dims, indent=1, sort_keys=True))


def rename_to_model_names(universal_dir: Path, source_dir: Path, n_layers: int) -> None:
    """Turn ds_to_universal's output for a pipeline checkpoint (`source_dir`) into MegaKVModel names.

    Stage 0's DeepSpeed pickle is read by the weights-only unpickler (the globals DeepSpeed stores only).
    """
    universal_dir, zero = Path(universal_dir), Path(universal_dir) / ZERO_DIR
    for folder in sorted(p for p in zero.iterdir() if p.is_dir()):
        target = zero / dense_name(folder.name, n_layers)
        if target.exists():
            raise FileExistsError(f"{folder} and {target} name the same MegaKVModel parameter")
        folder.rename(target)
    stage_zero = load_deepspeed_file(universal_dir / MODEL_STATES)
    stage_zero["module"] = layer_files_state(source_dir, n_layers)  # the module weights, MegaKVModel keys
    stage_zero["param_shapes"] = None  # per-stage shapes; a universal load takes the loading engine's own
    stage_zero["mp_world_size"] = 1
    torch.save(stage_zero, universal_dir / MODEL_STATES)
    for path in universal_dir.iterdir():
        if STAGE_FILE.match(path.name) and path.name != MODEL_STATES:
            path.unlink()


def _is_pipe_engine(engine) -> bool:
    from deepspeed.runtime.pipe.engine import PipelineEngine

    return isinstance(engine, PipelineEngine)


def load_universal(engine, ckpt_dir: Path, tag: str, config_yaml: str):
    """engine.load_checkpoint of a MegaKVModel-named universal checkpoint, for the dense or the pipe engine;
    `config_yaml`: the resolved config saved with it. Returns DeepSpeed's (load_path, client_state).
    """
    if not _is_pipe_engine(engine):
        return engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                      load_lr_scheduler_states=True)
    n_layers = int(OmegaConf.create(config_yaml)["model"]["n_layers"])
    optimizer = engine.optimizer
    own_names = optimizer.param_names
    optimizer.param_names = {param: dense_name(name, n_layers) for param, name in own_names.items()}
    try:
        # not strict: the module state is MegaKVModel-keyed; every weight then comes from its fp32 master
        return engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                      load_lr_scheduler_states=True, load_module_strict=False)
    finally:
        optimizer.param_names = own_names


# ----------------------------------------------------------------------------- tensor-parallel sources

STATE_KEYS = ("fp32", "exp_avg", "exp_avg_sq")


def _rank_optimizer_states(tag_dir: Path, tensor_rank: int) -> list[dict]:
    paths = {}
    for path in tag_dir.iterdir():
        match = OPTIM_FILE.match(path.name)
        if match and int(match.group(2)) == tensor_rank:
            paths[int(match.group(1))] = path
    if not paths or sorted(paths) != list(range(len(paths))):
        raise FileNotFoundError(f"{tag_dir}: the optimizer partitions of tensor rank {tensor_rank} are incomplete "
                                f"(data ranks found: {sorted(paths)})")
    return [load_deepspeed_file(paths[d])["optimizer_state_dict"] for d in sorted(paths)]


def _split_flat(parts: list[torch.Tensor], shapes: dict) -> dict[str, torch.Tensor]:
    """One parameter group's flat partitions (data ranks in order) -> per-parameter views of one flat tensor
    (no copy per parameter: the merge copies them once, into the dense tensors it writes)."""
    flat, offset, out = parts[0] if len(parts) == 1 else torch.cat(parts), 0, {}
    for name, shape in shapes.items():  # back to back; only the group's end is padded
        count = shape.numel()
        out[name] = flat[offset:offset + count].view(shape)
        offset += count
    return out


def _global_optimizer_state(optim: dict) -> dict:
    """What DeepSpeed's universal loader reads besides the per-parameter files (no partitions)."""
    state = {k: v for k, v in optim.items()
             if k not in ("base_optimizer_state", "single_partition_of_fp32_groups", "param_slice_mappings")}
    state["param_groups"] = optim["base_optimizer_state"]["param_groups"]
    return state


def _rank_state(tag_dir: Path, model_rank: int, n_layers: int | None
                ) -> tuple[dict, dict[str, dict[str, torch.Tensor]], list, dict]:
    """(model states, {state key: {name: tensor}}, per-group step, global optimizer state) of one model-parallel
    rank (a tensor rank, or under TP x PP a (stage, tensor rank) pair), all data ranks merged; `n_layers`
    (pipeline runs only) turns the pipe engine's names into MegaKVModel names."""
    states = load_deepspeed_file(tag_dir / f"mp_rank_{model_rank:02d}_model_states.pt")
    optim = _rank_optimizer_states(tag_dir, model_rank)
    per_key: dict[str, dict[str, torch.Tensor]] = {key: {} for key in STATE_KEYS}
    steps = []
    for group, shapes in enumerate(states["param_shapes"]):
        if n_layers is not None:
            shapes = {dense_name(name, n_layers): shape for name, shape in shapes.items()}
        per_key["fp32"].update(_split_flat([o["single_partition_of_fp32_groups"][group] for o in optim], shapes))
        adam = [o["base_optimizer_state"]["state"][group] for o in optim]
        for key in ("exp_avg", "exp_avg_sq"):
            per_key[key].update(_split_flat([a[key] for a in adam], shapes))
        steps.append(adam[0]["step"])
    return states, per_key, steps, _global_optimizer_state(optim[0])


def _tensor_rank_state(tag_dir: Path, tensor_rank: int, tensor: int, stages: int, n_layers: int
                       ) -> tuple[dict, dict[str, dict[str, torch.Tensor]], list, dict]:
    """One tensor rank's state over every pipeline stage: DeepSpeed's model-parallel rank of (stage s,
    tensor rank t) is s * tensor + t. The model states and global optimizer state returned are stage 0's."""
    if stages == 1:
        return _rank_state(tag_dir, tensor_rank, None)
    per_stage = [_rank_state(tag_dir, stage * tensor + tensor_rank, n_layers) for stage in range(stages)]
    per_key = {key: {name: value for _, state, _, _ in per_stage for name, value in state[key].items()}
               for key in STATE_KEYS}
    return per_stage[0][0], per_key, [step for _, _, steps, _ in per_stage for step in steps], per_stage[0][3]


def tensor_to_universal(tag_dir: Path, out_dir: Path, cfg) -> None:
    """A layout-free universal checkpoint of a tensor-parallel (TP x DP, or TP x PP x DP) checkpoint: every
    tensor rank's fp32 masters and Adam moments merged into MegaKVModel-shaped tensors (megakv's own shard
    merge, not ds_to_universal's, which knows nothing of replicated K/V heads), written in DeepSpeed's
    per-parameter format. `cfg`: the run's ModelConfig; the layout is read from the files: the tensor degree
    is the number of tensor ranks of the layer files (a pipeline run) or of the mp_rank files (no pipeline).
    """
    from megakv.parallel.tensor_split import merge_state_dicts, tensor_split

    tag_dir, out_dir = Path(tag_dir), Path(out_dir)
    model_ranks = len([p for p in tag_dir.iterdir() if STAGE_FILE.match(p.name)])
    layer_ranks = {int(m.group(2)) for m in (LAYER_FILE.match(p.name) for p in tag_dir.iterdir()) if m}
    tensor = len(layer_ranks) if layer_ranks else model_ranks
    if model_ranks % tensor:
        raise ValueError(f"{tag_dir}: {model_ranks} mp_rank files do not split into pipeline stages of "
                         f"{tensor} tensor ranks")
    stages = model_ranks // tensor
    # Memory: every tensor rank's masters and moments are held once, as views of the flat partitions read from
    # disk; each state key is merged, written and let go in turn (this held ~12x the fp32 model at once).
    states, shards, steps_of_rank, global_state = _tensor_rank_state(tag_dir, 0, tensor, stages, cfg.n_layers)
    per_rank, all_steps = [shards], [steps_of_rank]
    for t in range(1, tensor):
        _, shards, steps_of_rank, _ = _tensor_rank_state(tag_dir, t, tensor, stages, cfg.n_layers)
        per_rank.append(shards)
        all_steps.append(steps_of_rank)
    steps = [float(step) for step in all_steps[0]]
    if any([float(step) for step in s] != steps for s in all_steps) or len(set(steps)) != 1:
        raise ValueError(f"{tag_dir}: the optimizer step counts differ between groups or tensor ranks")
    split = tensor_split(cfg, tensor)
    # the module weights in the training precision; a pipe engine's mp_rank files hold none (its layer files do)
    module = states["module"] if stages == 1 else layer_files_state(tag_dir, cfg.n_layers, split)
    zero, dense_module = out_dir / ZERO_DIR, {}
    for key in STATE_KEYS:
        merged = merge_state_dicts([shards[key] for shards in per_rank], split)
        for shards in per_rank:
            shards[key] = {}  # this key's flat partitions are freed once merged
        for name, value in merged.items():
            folder = zero / name
            folder.mkdir(parents=True, exist_ok=True)
            torch.save({"param": value, "cat_dim": 0}, folder / f"{key}.pt")
            if key == "fp32":
                torch.save(torch.tensor(steps[0]), folder / "step.pt")
                dense_module[name] = value.to(module[name].dtype)
        del merged
    torch.save(global_state, zero / "optimizer_state.pt")
    states["module"] = dense_module
    states["param_shapes"] = None
    states["mp_world_size"] = 1
    torch.save(states, out_dir / MODEL_STATES)
