"""Find the model behind a path: the one place the inference, evaluation and export tools resolve `--model`.

It sits above megakv.hf, megakv.train and megakv.inference (it reads all three kinds of directory), so
none of them imports it and no import cycle runs through it.

Accepted today:
  * a megakv model directory (config.yaml + model.safetensors [+ tokenizer/]);
  * a transformers checkpoint directory (config.json): Llama / Mistral / Qwen2 / Qwen3 through the core
    weight mapping, or a directory exported by `megakv-convert to-hf-rcla` (model_type "megakv").
  * a training run directory (megakv-train's train.run_dir): the fp32 weights of its latest complete
    checkpoint, consolidated from any ZeRO stage, with the run's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megakv.model import MegaKVModel
from megakv.model_dir import CONFIG_FILE, WEIGHTS_FILE, is_model_dir, load_model, model_from_state_dict, tokenizer_path
from megakv.train.run_dir import CHECKPOINTS, TOKENIZER

HF_TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def _has_hf_tokenizer(path: Path) -> bool:
    return any((path / name).is_file() for name in HF_TOKENIZER_MARKERS)


def default_retain(path: str | Path) -> str:
    """The retention a model path deploys with when the user names none.

    A `to-hf-rcla` export stores its own (`retain` in config.json, as `from_pretrained` uses it); every
    other kind of model keeps the full cache.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        from megakv.hf.modeling import is_megakv_hf_dir, stored_retain

        if is_megakv_hf_dir(path):
            return stored_retain(path)
    return "all"


def resolve_model(path: str | Path, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None) -> tuple[MegaKVModel, Path | None]:
    """(model in eval mode, tokenizer directory or None) for a model path; see the module docstring."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    if is_model_dir(path):
        return load_model(path, device, dtype), tokenizer_path(path)
    if (path / CHECKPOINTS).is_dir():
        from megakv.train.export import consolidated_state_dict

        cfg, state, _tag = consolidated_state_dict(path)
        tokenizer = path / TOKENIZER
        return model_from_state_dict(cfg, state, device, dtype, source=str(path)), (
            tokenizer if tokenizer.is_dir() else None)
    if (path / "config.json").is_file():
        from megakv.hf.modeling import is_megakv_hf_dir, load_megakv_hf_dir

        if is_megakv_hf_dir(path):
            model, _retain = load_megakv_hf_dir(path, device, dtype)
        else:
            from megakv.hf.checkpoint import load_hf_checkpoint

            cfg, state = load_hf_checkpoint(path)  # refuses other architectures with UnsupportedCheckpoint
            model = model_from_state_dict(cfg, state, device, dtype, source=str(path))
        return model, path if _has_hf_tokenizer(path) else None
    raise ValueError(
        f"{path} is not a model: expected a megakv model directory ({CONFIG_FILE} + {WEIGHTS_FILE}), a training "
        f"run directory (with {CHECKPOINTS}/) or a transformers checkpoint directory (config.json + weights)")
