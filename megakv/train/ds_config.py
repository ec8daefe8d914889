"""The DeepSpeed JSON, generated from the typed config: the config is the only place a value lives.

A fragment from ds_configs/ (parallel.ds_fragment) may add tuning keys the typed config does not model
(bucket sizes, overlap, prefetch). A fragment key that the typed config owns, or that megakv generates
(e.g. bf16.check_grad_overflow, which non-finite-step skipping relies on), must carry the same value, and
DeepSpeed's older aliases of owned keys (bfloat16, cpu_offload) are refused: a contradiction is an error,
never a silent win for either side.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from megakv.config import ConfigError, MegaKVConfig

# Readable fragments (ds_configs/zero1.json, ...), shipped as package data so installed copies have them.
FRAGMENT_DIR = Path(__file__).resolve().parents[1] / "ds_configs"

# DeepSpeed keys (dotted prefixes) the typed config owns -> the config field to name in errors.
OWNED_KEYS = {
    "train_batch_size": "train.global_batch",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.global_batch",
    "gradient_clipping": "optim.grad_clip",
    "optimizer": "optim",
    "scheduler": "optim.schedule",
    "bf16.enabled": "train.precision",
    "fp16.enabled": "train.precision",
    "zero_optimization.stage": "parallel.zero_stage",
    "zero_optimization.offload_optimizer.device": "parallel.offload_optimizer",
    "zero_optimization.offload_param.device": "parallel.offload_optimizer",
    "checkpoint.load_universal": "checkpoint.resume",
    "zero_force_ds_cpu_optimizer": "parallel.offload_optimizer",
    "data_types": "train.precision",
}
# DeepSpeed's older spellings of owned keys: it still honours them, so they could bypass the check above.
ALIAS_KEYS = {
    "bfloat16": "train.precision",
    "amp": "train.precision",
    "zero_optimization.cpu_offload": "parallel.offload_optimizer",
    "zero_optimization.cpu_offload_params": "parallel.offload_optimizer",
}
# DeepSpeed features that write to a path or send data to a service the fragment names: a fragment someone sent
# you could overwrite any file you can write (flops_profiler.output_file did, reproduced) or send your metrics away.
OUTPUT_KEYS = {
    "tensorboard": "megakv writes TensorBoard into the run directory (logging.tensorboard)",
    "csv_monitor": "megakv writes metrics.jsonl and TensorBoard into the run directory",
    "wandb": "megakv writes metrics.jsonl and TensorBoard into the run directory",
    "comet": "megakv writes metrics.jsonl and TensorBoard into the run directory",
    "flops_profiler.output_file": "without it the profile goes to the log",
    "autotuning": "megakv does not run DeepSpeed's autotuner",
    "nebula": "megakv writes its checkpoints into the run directory",
}
GENERATED = "megakv's generated DeepSpeed config"  # the owner of a generated key the table does not name


def gradient_accumulation_steps(cfg: MegaKVConfig, data_parallel: int) -> int:
    per_step = cfg.train.micro_batch * data_parallel
    if cfg.train.global_batch % per_step:
        raise ConfigError("train.global_batch", cfg.train.global_batch,
                          f"not divisible by micro_batch x data-parallel ranks = {cfg.train.micro_batch} x "
                          f"{data_parallel} = {per_step}",
                          "choose global_batch = micro_batch x data-parallel ranks x accumulation steps")
    return cfg.train.global_batch // per_step


def generated_ds_config(cfg: MegaKVConfig, data_parallel: int, load_universal: bool = False) -> dict[str, Any]:
    """The part of the DeepSpeed config that the typed config decides, before any fragment."""
    o, p = cfg.optim, cfg.parallel
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": p.offload_optimizer}
    ds: dict[str, Any] = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": gradient_accumulation_steps(cfg, data_parallel),
        # Always explicit: DeepSpeed's default is 1.0, and an absent key was applied inconsistently.
        "gradient_clipping": o.grad_clip,
        "optimizer": {
            "type": "AdamW",
            # torch's AdamW: DeepSpeed's fused/CPU Adam would JIT-compile C++ on first use.
            "params": {"lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
                       "torch_adam": True},
        },
        "bf16": {"enabled": cfg.train.precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "checkpoint": {"load_universal": load_universal},
        "steps_per_print": 2**31 - 1,  # megakv logs progress itself
        "wall_clock_breakdown": False,
    }
    if p.offload_optimizer != "none":
        ds["zero_force_ds_cpu_optimizer"] = False  # keep torch's AdamW (no cpu_adam JIT build)
    if cfg.train.precision == "bf16" and p.zero_stage >= 2:
        # Sum the micro-batches' gradients in fp32, not bf16 (DeepSpeed's default: 0.3% off at 8 micro-batches,
        # 1% at 128). At ZeRO-1 DeepSpeed would switch to another optimizer whose checkpoints megakv cannot read.
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    if p.pipeline > 1:
        # Stages send (packed hidden + K/V, plan): never split the first output across tensor ranks.
        ds["pipeline"] = {"pipe_partitioned": False, "grad_partitioned": False}
        if cfg.train.activation_checkpointing:  # non-reentrant: the embedding keeps its gradient
            ds["pipeline"].update(activation_checkpoint_interval=1, use_reentrant=False)
    return ds


def fragment_path(name: str) -> Path:
    """A fragment is named (zero2 -> ds_configs/zero2.json) or given as a path to a JSON file."""
    as_path = Path(name)
    if as_path.suffix == ".json" and as_path.is_file():
        return as_path
    candidate = FRAGMENT_DIR / f"{name}.json"
    if candidate.is_file():
        return candidate
    known = sorted(f.stem for f in FRAGMENT_DIR.glob("*.json")) if FRAGMENT_DIR.is_dir() else []
    raise ConfigError("parallel.ds_fragment", name, "no such DeepSpeed fragment",
                      f"use one of {known} or the path of a JSON file")


def load_fragment(name: str) -> dict[str, Any]:
    path = fragment_path(name)
    try:
        fragment = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError("parallel.ds_fragment", str(path), f"not valid JSON ({e})", "fix the file") from None
    if not isinstance(fragment, dict):
        raise ConfigError("parallel.ds_fragment", str(path), "must hold a JSON object", "fix the file")
    return fragment


def _leaves(tree: dict[str, Any], prefix: str = ""):
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + ".")
        else:
            yield path, value


def _owner(path: str, table: dict[str, str]) -> str | None:
    for key, field in table.items():
        if path == key or path.startswith(key + "."):
            return field
    return None


def _lookup(tree: dict[str, Any], path: str) -> tuple[bool, Any]:
    node: Any = tree
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def check_fragment(generated: dict[str, Any], fragment: dict[str, Any], name: str) -> None:
    """Refuse a fragment that sets a value the typed config owns, or megakv generates, to something else."""
    for path, value in _leaves(fragment):
        output = _owner(path, OUTPUT_KEYS)
        switched_off = value is None or (path.endswith(".enabled") and value is False)
        if output is not None and not switched_off:
            raise ConfigError("parallel.ds_fragment", name, f"it sets {path}, which makes DeepSpeed write to a path or "
                              f"service the fragment names ({output})", f"remove {path} from the fragment")
        alias = _owner(path, ALIAS_KEYS)
        if alias is not None:
            raise ConfigError(alias, "(from the config)",
                              f"DeepSpeed fragment {name!r} sets {path}, an older DeepSpeed spelling of a setting "
                              "the config owns", f"remove {path} from the fragment and set {alias} instead")
        present, ours = _lookup(generated, path)
        owner = _owner(path, OWNED_KEYS) or (GENERATED if present else None)
        if owner is None:
            continue
        if not present or not _same(ours, value):
            shown = ours if present else "(unset)"
            raise ConfigError(owner, shown,
                              f"DeepSpeed fragment {name!r} sets {path}={value!r}, which contradicts the config",
                              f"remove {path} from the fragment, change {owner} to match it, or choose "
                              "another fragment (parallel.ds_fragment=zero1|zero2|zero3, or null for none)")


def build_ds_config(cfg: MegaKVConfig, data_parallel: int, load_universal: bool = False) -> dict[str, Any]:
    generated = generated_ds_config(cfg, data_parallel, load_universal)
    if cfg.parallel.ds_fragment is None:
        return generated
    fragment = load_fragment(cfg.parallel.ds_fragment)
    check_fragment(generated, fragment, cfg.parallel.ds_fragment)
    return _deep_merge(generated, fragment)
