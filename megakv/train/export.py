"""Offline tools on a run directory: consolidated fp32 weights and universal-checkpoint conversion.

Neither needs a process group: both read the sharded files DeepSpeed wrote.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from megakv.config import ModelConfig
from megakv.config.errors import ConfigError
from megakv.directories import replace_directory
from megakv.safe_load import check_deepspeed_dir, first_link, forced_weights_only
from megakv.train.checkpoint import (
    LATEST_UNIVERSAL,
    TMP_PREFIX,
    checkpoint_files,
    latest_checkpoint,
    manifest_of,
    read_pointer,
    universal_tag,
    write_pointer,
)
from megakv.train.run_dir import CHECKPOINTS, CONFIG, LINK_FIX, LINK_PROBLEM, TOKENIZER, checkpoints_dir
from megakv.train.state import RNG_DIR, TrainState


def _require_latest(run_dir: Path) -> tuple[str, TrainState]:
    link = first_link(run_dir)
    if link is not None:  # conversions write into the run directory, exports copy its tokenizer
        raise ValueError(f"refusing {run_dir}: {link} is a link: {LINK_PROBLEM}. Fix: {LINK_FIX}")
    found = latest_checkpoint(checkpoints_dir(run_dir))
    if found is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint ({run_dir / CHECKPOINTS} holds no step_* directory): "
                                f"pass the run directory of a megakv-train run that saved one")
    return found


def model_config_of(state: TrainState) -> ModelConfig:
    """The model section of the resolved config stored with the checkpoint."""
    raw = OmegaConf.create(state.config_yaml)
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), raw.get("model", {}))
    cfg: ModelConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    try:
        cfg.validate("model")
    except ConfigError as e:
        raise ValueError(f"the checkpoint's model config is invalid: {e}") from None
    return cfg


# A live run removes its oldest checkpoint (checkpoint.keep_last) right after saving a new one: the checkpoint an
# export chose can vanish while it is read. Then the newest is chosen again, a few times at most.
_READ_ATTEMPTS = 3


def consolidated_state_dict(run_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """fp32 weights of the latest complete checkpoint, whatever the ZeRO stage and number of ranks; of a run
    still training too."""
    run_dir = Path(run_dir)
    for _ in range(_READ_ATTEMPTS - 1):
        tag, state = _require_latest(run_dir)
        try:
            return _consolidate(run_dir, tag, state)
        except Exception:
            if (checkpoints_dir(run_dir) / tag).is_dir():
                raise  # still there: the error is the checkpoint's, not the live run's
            print(f"megakv: {tag} of {run_dir} was removed while it was read (the run is still training and "
                  "keeps checkpoint.keep_last); reading its newest checkpoint instead", file=sys.stderr)
    tag, state = _require_latest(run_dir)
    return _consolidate(run_dir, tag, state)


def _consolidate(run_dir: Path, tag: str, state: TrainState) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if int(state.layout.get("pipeline", 1)) > 1:
        return _pipeline_state_dict(run_dir, tag, state)
    if int(state.layout.get("tensor", 1)) > 1:
        return _tensor_state_dict(run_dir, tag, state)
    check_deepspeed_dir(checkpoints_dir(run_dir) / tag)  # zero_to_fp32 unpickles with weights_only=False
    with forced_weights_only(checkpoints_dir(run_dir) / tag):
        weights = get_fp32_state_dict_from_zero_checkpoint(str(checkpoints_dir(run_dir)), tag=tag)
    # Own storage per tensor: zero_to_fp32 returns views into one flat buffer, which safetensors refuses.
    weights = {name: tensor.float().clone() for name, tensor in weights.items()}
    return model_config_of(state), weights, tag


def _pipeline_state_dict(run_dir: Path, tag: str, state: TrainState) -> tuple[ModelConfig, dict, str]:
    """A pipeline run: layer files (fp32 runs) or the optimizer's fp32 masters (bf16), as MegaKVModel keys."""
    from megakv.parallel.pipeline_files import layer_files_state, master_weights_state
    from megakv.parallel.tensor_split import tensor_split

    cfg = model_config_of(state)
    tag_dir = checkpoints_dir(run_dir) / tag
    precision = OmegaConf.create(state.config_yaml).get("train", {}).get("precision", "fp32")
    split = tensor_split(cfg, int(state.layout.get("tensor", 1)))  # TP x PP: the shards are merged
    if precision == "fp32":
        weights = layer_files_state(tag_dir, cfg.n_layers, split)
    else:
        check_deepspeed_dir(tag_dir)  # the optimizer shards unpickle with weights_only=False
        with forced_weights_only(tag_dir):
            weights = master_weights_state(tag_dir, cfg.n_layers, split)
    return cfg, {name: tensor.float().clone() for name, tensor in weights.items()}, tag


def _tensor_state_dict(run_dir: Path, tag: str, state: TrainState) -> tuple[ModelConfig, dict, str]:
    """A tensor-parallel run: every tensor rank's shard (module weights, or the fp32 masters of a bf16 run)
    merged into the dense MegaKVModel state dict."""
    from megakv.parallel.tensor_files import tensor_checkpoint_state

    cfg = model_config_of(state)
    precision = OmegaConf.create(state.config_yaml).get("train", {}).get("precision", "fp32")
    weights = tensor_checkpoint_state(checkpoints_dir(run_dir) / tag, cfg, int(state.layout["tensor"]),
                                      masters=precision != "fp32")
    return cfg, weights, tag


def export_model_dir(run_dir: str | Path, out_dir: str | Path, hf: bool = False, overwrite: bool = False) -> Path:
    """A megakv model directory (or, with hf=True, a transformers one) with the run's tokenizer."""
    from megakv.hf.checkpoint import save_hf_checkpoint
    from megakv.model_dir import save_model_dir

    run_dir = Path(run_dir)
    cfg, weights, _ = consolidated_state_dict(run_dir)
    tokenizer = run_dir / TOKENIZER
    tokenizer_dir = tokenizer if tokenizer.is_dir() else None
    generation = _base_generation_config(run_dir, out_dir)
    if hf:
        return save_hf_checkpoint(cfg, weights, out_dir, tokenizer_dir=tokenizer_dir, overwrite=overwrite,
                                  generation=generation)
    return save_model_dir(cfg, weights, out_dir, tokenizer_dir=tokenizer_dir, overwrite=overwrite,
                          generation=generation)


def _base_generation_config(run_dir: Path, out_dir: str | Path) -> dict | None:
    """A fine-tune's sampling defaults: those of the model directory it started from (checkpoint.init_from, an
    imported model's generation_config.json), when that directory is still there; when it has gone, a warning
    says what the export lacks and how to restore it."""
    from megakv.hf.checkpoint import read_generation_config
    from megakv.model_dir import GENERATION_FILE

    config = run_dir / CONFIG
    init_from = OmegaConf.load(config).get("checkpoint", {}).get("init_from") if config.is_file() else None
    if not init_from:
        return None
    if not Path(init_from).is_dir():
        where = Path(init_from).absolute()  # a relative path is read from the current directory
        print(f"megakv-convert: warning: checkpoint.init_from {init_from} (the model this run fine-tuned) is not "
              f"found at {where}, so {out_dir} gets no {GENERATION_FILE} from it: the base model's sampling "
              f"defaults (do_sample, temperature, top_p...), if it had any, are lost and transformers' generate() on "
              f"the export decodes greedily. Fix: run from the directory the run was launched from, or copy "
              f"{GENERATION_FILE} from the base model into {out_dir}", file=sys.stderr, flush=True)
        return None
    return read_generation_config(init_from)


def convert_to_universal(run_dir: str | Path, workers: int = 1) -> Path:
    """Convert the latest checkpoint so a launch with another data-parallel or pipeline size can resume from it.

    Runs DeepSpeed's ds_to_universal into a temporary directory, adds the megakv state and RNG files,
    renames it to `<tag>_universal` and then points `latest_universal` at it.
    """
    run_dir = Path(run_dir)
    ckpt_dir = checkpoints_dir(run_dir)
    tag, state = _require_latest(run_dir)
    if int(state.layout.get("zero_stage", 0)) == 3:  # nothing could resume from it (see preflight.find_resume)
        raise ValueError(f"{ckpt_dir / tag} was written at ZeRO stage 3: DeepSpeed cannot load a ZeRO-3 optimizer "
                         "state into another layout intact, so a ZeRO-3 run resumes on its own layout only. Fix: "
                         f"resume on the layout that wrote it, or export the weights (`megakv-convert "
                         f"from-checkpoint {run_dir} DIR`) and start a new run with checkpoint.init_from=DIR")
    check_deepspeed_dir(ckpt_dir / tag)  # ds_to_universal unpickles with weights_only=False
    target = ckpt_dir / universal_tag(tag)
    tmp = ckpt_dir / (TMP_PREFIX + universal_tag(tag))
    shutil.rmtree(tmp, ignore_errors=True)
    pointer = read_pointer(ckpt_dir, LATEST_UNIVERSAL)  # ds_to_universal points it at `tmp` before megakv is done
    try:
        return _convert(ckpt_dir, tag, state, tmp, target, workers)
    except BaseException:  # nothing half-made is left, and the pointer names what it named before
        shutil.rmtree(tmp, ignore_errors=True)
        if pointer is not None:
            write_pointer(ckpt_dir, pointer, LATEST_UNIVERSAL)
        else:
            (ckpt_dir / LATEST_UNIVERSAL).unlink(missing_ok=True)
        raise


def run_showing_progress(cmd: list[str], keep_chars: int = 6000) -> tuple[int, str]:
    """Run `cmd` with its output (DeepSpeed's progress bars) passed on to stderr; (exit code, the output's
    last `keep_chars` characters, for the error message)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail = ""
    for chunk in iter(lambda: proc.stdout.read(256), ""):
        sys.stderr.write(chunk)
        tail = (tail + chunk)[-keep_chars:]
    sys.stderr.flush()
    return proc.wait(), tail


def _convert(ckpt_dir: Path, tag: str, state: TrainState, tmp: Path, target: Path, workers: int) -> Path:
    if int(state.layout.get("tensor", 1)) > 1:  # megakv merges the shards itself (replicated K/V heads)
        from megakv.parallel.universal import tensor_to_universal

        tmp.mkdir()
        tensor_to_universal(ckpt_dir / tag, tmp, model_config_of(state))
        return _finish_universal(ckpt_dir, tag, state, tmp, target)
    cmd = [sys.executable, "-m", "megakv.train.safe_ds_to_universal", "--input_folder", str(ckpt_dir / tag),
           "--output_folder", str(tmp), "--inject_missing_state", "--num_extract_workers", str(workers),
           "--num_merge_workers", str(workers)]
    code, tail = run_showing_progress(cmd)
    if code != 0:
        raise RuntimeError(f"ds_to_universal failed (exit {code}):\n{tail}")
    if int(state.layout.get("pipeline", 1)) > 1:  # a layout-free checkpoint: MegaKVModel parameter names
        from megakv.parallel.universal import rename_to_model_names

        rename_to_model_names(tmp, ckpt_dir / tag, model_config_of(state).n_layers)
    return _finish_universal(ckpt_dir, tag, state, tmp, target)


def _finish_universal(ckpt_dir: Path, tag: str, state: TrainState, tmp: Path, target: Path) -> Path:
    from megakv.parallel.universal import record_split_dims

    record_split_dims(tmp)  # so a launch with tensor parallelism cuts each tensor the way megakv splits it
    if (ckpt_dir / tag / RNG_DIR).is_dir():
        shutil.copytree(ckpt_dir / tag / RNG_DIR, tmp / RNG_DIR)
    state.converted_from = state.manifest_digest()  # the source checkpoint's files, as saved
    state.files = manifest_of(tmp, checkpoint_files(tmp))  # the converted directory's own files
    state.write(tmp)
    replace_directory(tmp, target)
    write_pointer(ckpt_dir, target.name, LATEST_UNIVERSAL)
    return target
