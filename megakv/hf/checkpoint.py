"""Read and write transformers checkpoint directories (`save_pretrained` layout) for megakv models."""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from megakv.config import ModelConfig
from megakv.hf.mapping import (
    HF_CLASSES,
    UnsupportedCheckpoint,
    hf_config_from_model_config,
    model_config_from_hf,
    state_dict_from_hf,
    state_dict_to_hf,
)
from megakv.json_input import TOO_DEEP, parse_json
from megakv.model_dir import GENERATION_FILE, check_fits_dtype, read_safetensors, write_directory_atomically


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{hf_dir} has no config.json: expected a transformers checkpoint directory "
                                f"written by save_pretrained")
    config = _read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not a config object. Fix: use the "
                         "config.json that save_pretrained wrote")
    return config


def _read_json(path: Path):
    try:
        return parse_json(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        if str(e) == TOO_DEEP:  # e.g. 200,000 '[': a damaged or crafted file, not a config
            raise ValueError(f"{path} holds {TOO_DEEP} (damaged or not a transformers file). Fix: copy the "
                             "checkpoint directory again") from None
        raise ValueError(f"{path} is not valid JSON ({e}). Fix: copy the checkpoint directory again") from None


# A damaged weights file of a transformers directory: what to do about it.
_REFETCH = "download or copy the checkpoint directory again"


def hf_weight_files(hf_dir: str | Path) -> list[Path]:
    """The files holding a transformers directory's weights, in reading order."""
    hf_dir = Path(hf_dir)
    if (hf_dir / "model.safetensors").is_file():
        return [hf_dir / "model.safetensors"]
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        index_json = _read_json(index)
        weight_map = index_json.get("weight_map") if isinstance(index_json, dict) else None
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no weight_map. Fix: {_REFETCH}")
        shards = [hf_dir / shard for shard in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise FileNotFoundError(f"{shard} does not exist ({index.name} lists it). Fix: {_REFETCH}")
        return shards
    if (hf_dir / "pytorch_model.bin").is_file():
        return [hf_dir / "pytorch_model.bin"]
    raise FileNotFoundError(f"{hf_dir} holds no weights (model.safetensors, a sharded index or pytorch_model.bin)")


def read_hf_weights(hf_dir: str | Path, progress: Callable[[int, int], None] | None = None,
                    ) -> dict[str, torch.Tensor]:
    """Every weight of a transformers directory; `progress(bytes read, bytes in all)` after each file."""
    files = hf_weight_files(hf_dir)
    total, done = sum(path.stat().st_size for path in files), 0
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        weights.update(_read_pytorch_bin(path) if path.suffix == ".bin" else read_safetensors(path, fix=_REFETCH))
        done += path.stat().st_size
        if progress is not None:
            progress(done, total)
    return weights


def _read_pytorch_bin(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, through the weights-only unpickler: a file that needs any other global is refused
    (a pickle can run code), so is one that is not a dict of tensors."""
    from megakv.safe_load import UnsafeFileError, load_weights_only

    fix = ("convert it to model.safetensors with the tool that wrote it (save_pretrained(..., "
           "safe_serialization=True)), or use a copy from a source you trust")
    try:
        state = load_weights_only(path)
    except UnsafeFileError as e:
        needs = f"it needs the global {e.global_name!r}" if e.global_name else "the weights-only unpickler refused it"
        raise UnsupportedCheckpoint(f"refusing to load {path}: {needs}; nothing from it was run. Fix: {fix}") from None
    except (RuntimeError, EOFError, OSError) as e:  # not a torch file, or a truncated one
        raise ValueError(f"{path}: truncated or not a torch file ({str(e).splitlines()[0][:200]}). "
                         f"Fix: {_REFETCH}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UnsupportedCheckpoint(f"{path} does not hold a state dict (names -> tensors). Fix: {fix}")
    return state


def read_generation_config(directory: str | Path) -> dict | None:
    """A directory's generation_config.json (a transformers checkpoint's, or the copy a megakv model directory
    keeps of it), or None."""
    path = Path(directory) / GENERATION_FILE
    if not path.is_file():
        return None
    generation = _read_json(path)
    if not isinstance(generation, dict):
        raise ValueError(f"{path} holds a JSON {type(generation).__name__}, not an object of settings. Fix: "
                         "correct it, or remove generation_config.json")
    return generation


# Decided by megakv (the token ids) or written by transformers itself: never carried from a source.
NOT_CARRIED_GENERATION_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id", "transformers_version")


def write_generation_config(directory: Path, token_ids: dict, source: dict | None, hf_cfg=None) -> None:
    """The generation_config.json of an export: the imported model's settings (do_sample, temperature, top_k,
    top_p, repetition_penalty...) when it had them, so transformers' generate() on the export samples as on the
    original, with megakv's bos/eos/pad ids. Written as JSON, not through GenerationConfig.save_pretrained: that
    refuses settings transformers loads with a warning (a temperature without do_sample, common on the Hub)."""
    from transformers import GenerationConfig

    if source:
        kept = {k: v for k, v in source.items() if k not in NOT_CARRIED_GENERATION_KEYS}
        ids = {k: v for k, v in token_ids.items() if v is not None}
        (directory / GENERATION_FILE).write_text(json.dumps({**kept, **ids}, indent=2, sort_keys=True) + "\n")
        return
    generation = GenerationConfig.from_model_config(hf_cfg) if hf_cfg is not None else GenerationConfig(**token_ids)
    generation.save_pretrained(directory)


def with_generation_stop_ids(cfg: ModelConfig, hf_dir: str | Path) -> ModelConfig:
    """`cfg` with the end-of-sequence ids generation_config.json adds to config.json's: transformers' generate()
    stops at those (e.g. an instruct model's end-of-turn token), so megakv's generation must stop there too."""
    path = Path(hf_dir) / GENERATION_FILE
    generation = read_generation_config(hf_dir)
    if generation is None:
        return cfg
    listed = generation.get("eos_token_id")
    listed = listed if isinstance(listed, list) else [] if listed is None else [listed]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in listed):
        raise ValueError(f"{path}: eos_token_id must be an id or a list of ids, got {listed!r}. Fix: correct it, "
                         "or remove generation_config.json")
    extra = [i for i in listed if i not in cfg.eos_token_ids]
    if not extra:
        return cfg
    merged = replace(cfg, eos_token_id=[*cfg.eos_token_ids, *extra])
    merged.validate()
    return merged


def untied_if_distinct(cfg: ModelConfig, hf_weights: dict[str, torch.Tensor], hf_dir: str | Path) -> ModelConfig:
    """`cfg` untied when tie_word_embeddings is true but the weights hold their own lm_head.weight, different from
    the embedding: transformers (5.24, PreTrainedModel.tie_weights) then does not tie and uses that lm_head, so
    megakv must too. An lm_head equal to the embedding (a .bin file saves both) stays tied."""
    head, embed = hf_weights.get("lm_head.weight"), hf_weights.get("model.embed_tokens.weight")
    if not cfg.tie_embeddings or head is None or embed is None:
        return cfg
    if head.shape == embed.shape and torch.equal(head, embed.to(head.dtype)):
        return cfg
    warnings.warn(f"{hf_dir}: config.json says tie_word_embeddings=true, but the weights hold their own "
                  "lm_head.weight, different from model.embed_tokens.weight: imported untied with that lm_head, as "
                  "transformers loads it (set tie_word_embeddings to false in config.json to silence this)",
                  stacklevel=3)
    return replace(cfg, tie_embeddings=False)


def load_hf_checkpoint(hf_dir: str | Path, progress: Callable[[int, int], None] | None = None,
                       ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A transformers Llama/Mistral/Qwen2/Qwen3 directory -> (ModelConfig, megakv state dict)."""
    cfg = with_generation_stop_ids(model_config_from_hf(read_hf_config(hf_dir), source=str(Path(hf_dir) /
                                                                                          "config.json")), hf_dir)
    hf_weights = read_hf_weights(hf_dir, progress)
    cfg = untied_if_distinct(cfg, hf_weights, hf_dir)
    if cfg.tie_embeddings is False and "lm_head.weight" not in hf_weights:
        raise UnsupportedCheckpoint(f"{hf_dir}: lm_head.weight is missing but tie_word_embeddings is false")
    return cfg, state_dict_from_hf(hf_weights, cfg)


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    """Put the tokenizer of `src` into `dst` so that transformers and megakv both load it; returns the file names.

    A megakv SentencePiece directory gets transformers files built from it (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json: same ids, see megakv.hf.tokenizer) besides its own `tokenizer.model`; any other
    source has its transformers tokenizer files copied. megakv's tokenizer metadata comes along when present,
    so megakv's tools read `dst` back as the same tokenizer.
    """
    from megakv.data.errors import DataError
    from megakv.data.tokenizer import METADATA_FILE, SPM_MODEL_FILE, LinkRefused, checked_source
    from megakv.hf.tokenizer import is_sentencepiece_dir, write_hf_tokenizer

    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        return []
    try:
        copied = write_hf_tokenizer(src, dst)
    except LinkRefused:
        raise
    except DataError as e:  # a SentencePiece model no exact transformers tokenizer exists for: megakv's files only
        warnings.warn(f"{dst} gets no transformers tokenizer files: {e}", stacklevel=2)
        copied = []
    extra = (SPM_MODEL_FILE, METADATA_FILE) if is_sentencepiece_dir(src) else (METADATA_FILE,) if copied else ()
    for name in extra:
        if name not in copied and (src / name).is_file():
            dst.mkdir(parents=True, exist_ok=True)
            if (src / name).resolve() != (dst / name).resolve():
                shutil.copy2(checked_source(src / name, src), dst / name)
            copied.append(name)
    return copied


def special_token_ids(cfg: ModelConfig, tokenizer_dir: str | Path | None) -> dict[str, int | list[int] | None]:
    """bos/eos/pad ids for an export's config.json and generation_config.json.

    The model config's own ids win; ids it leaves unset come from the tokenizer the model was trained with,
    so `generate()` of an export stops at end of sequence (megakv-trained models record them only there).
    """
    ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": cfg.pad_token_id}
    if tokenizer_dir is None or all(value is not None for value in ids.values()):
        return ids
    from megakv.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir, cfg.eos_token_ids)
    from_tokenizer = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                      "pad_token_id": tokenizer.pad_id}
    return {name: value if value is not None else from_tokenizer[name] for name, value in ids.items()}


def save_hf_checkpoint(cfg: ModelConfig, state_dict: dict[str, torch.Tensor], out_dir: str | Path,
                       tokenizer_dir: str | Path | None = None, overwrite: bool = False,
                       dtype: torch.dtype | None = None, generation: dict | None = None) -> Path:
    """Write `cfg` + weights as a transformers directory that `AutoModelForCausalLM.from_pretrained` loads;
    `generation`: the imported model's generation_config.json settings (see write_generation_config)."""
    from huggingface_hub import save_torch_state_dict

    hf_cfg = hf_config_from_model_config(cfg)
    tensors = state_dict_to_hf(state_dict, cfg)
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    check_fits_dtype(tensors, dtype)
    tensors = {k: (v.to(dtype) if dtype is not None else v).detach().contiguous().cpu() for k, v in tensors.items()}
    stored = {v.dtype for v in tensors.values() if v.is_floating_point()}
    if dtype is not None or len(stored) == 1:  # what the weights hold (transformers reads it as the default dtype)
        hf_cfg.dtype = str(dtype or stored.pop()).removeprefix("torch.")

    token_ids = special_token_ids(cfg, tokenizer_dir)
    for name, value in token_ids.items():
        setattr(hf_cfg, name, value)

    def fill(tmp: Path) -> None:
        hf_cfg.save_pretrained(tmp)
        write_generation_config(tmp, token_ids, generation, hf_cfg)
        save_torch_state_dict(tensors, tmp)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)

    return write_directory_atomically(out_dir, fill, overwrite)


__all__ = ["HF_CLASSES", "copy_tokenizer_files", "load_hf_checkpoint",
           "read_generation_config", "read_hf_config", "read_hf_weights", "save_hf_checkpoint", "special_token_ids",
           "write_generation_config"]
