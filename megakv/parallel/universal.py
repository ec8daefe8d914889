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

import re
from pathlib import Path

import torch
from omegaconf import OmegaConf

from megakv.parallel.pipeline import dense_name
from megakv.parallel.pipeline_files import layer_files_state

ZERO_DIR = "zero"
MODEL_STATES = "mp_rank_00_model_states.pt"
_STAGE_FILE = re.compile(r"^mp_rank_\d+_model_states\.pt$")
# A folder every converted checkpoint holds under MegaKVModel names (the embedding is never tied away).
NAMED_MARKER = "embed.weight"


def is_layout_free(tag_dir: Path) -> bool:
    """True for a universal checkpoint in MegaKVModel names (one any layout can load)."""
    return (Path(tag_dir) / ZERO_DIR / NAMED_MARKER).is_dir()


def rename_to_model_names(universal_dir: Path, source_dir: Path, n_layers: int) -> None:
    """Turn ds_to_universal's output for a pipeline checkpoint (`source_dir`) into MegaKVModel names.

    Loads DeepSpeed's own pickle of stage 0 (weights_only=False): call only on a directory checked by the caller.
    """
    universal_dir, zero = Path(universal_dir), Path(universal_dir) / ZERO_DIR
    for folder in sorted(p for p in zero.iterdir() if p.is_dir()):
        target = zero / dense_name(folder.name, n_layers)
        if target.exists():
            raise FileExistsError(f"{folder} and {target} name the same MegaKVModel parameter")
        folder.rename(target)
    stage_zero = torch.load(universal_dir / MODEL_STATES, map_location="cpu", weights_only=False)
    stage_zero["module"] = layer_files_state(source_dir, n_layers)  # the module weights, MegaKVModel keys
    stage_zero["param_shapes"] = None  # per-stage shapes; a universal load takes the loading engine's own
    stage_zero["mp_world_size"] = 1
    torch.save(stage_zero, universal_dir / MODEL_STATES)
    for path in universal_dir.iterdir():
        if _STAGE_FILE.match(path.name) and path.name != MODEL_STATES:
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
