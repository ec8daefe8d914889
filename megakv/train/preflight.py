"""Launch-time checks: everything a config or a run directory can get wrong, before any process group.

Knows the world size from the launcher's environment (ParallelLayout), so it can check batch sizes and
the ZeRO stage against the layout, the data files, the tokenizer against the model, and whether the run
directory can be resumed (same model; same data-parallel size or a universal checkpoint).
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from omegaconf import OmegaConf

from megakv.config import MegaKVConfig
from megakv.config.data import DataConfig
from megakv.config.devices import check_device
from megakv.config.errors import ConfigError
from megakv.config.model import ModelConfig
from megakv.parallel.layout import ParallelLayout
from megakv.parallel.tensor_split import tensor_split
from megakv.train.checkpoint import LATEST_UNIVERSAL, ResumePoint, latest_checkpoint, read_pointer, universal_tag
from megakv.train.ds_config import build_ds_config, gradient_accumulation_steps
from megakv.train.run_dir import checkpoints_dir
from megakv.train.state import TrainState


@dataclass
class Launch:
    """What the launch-time checks decided; the trainer takes it from here."""

    run_dir: Path
    data_parallel: int
    accumulation_steps: int
    ds_config: dict
    resume: ResumePoint | None


def check_data_files(cfg: MegaKVConfig) -> None:
    from megakv.data.indexed import bin_path, idx_path, pair_exists

    for name in ("datasets", "valid_datasets"):
        for i, prefix in enumerate(getattr(cfg.data, name)):
            if not pair_exists(prefix):
                raise ConfigError(f"data.{name}[{i}]", prefix,
                                  f"no prepared dataset: {bin_path(prefix)} and {idx_path(prefix)} must both exist",
                                  "give the prefix of a .bin/.idx pair written by megakv-prep (without suffix)")


def tokenizer_dir(cfg: MegaKVConfig) -> Path:
    """data.tokenizer, or the tokenizer/ that data preparation saved beside the first dataset."""
    return Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(cfg.data.datasets[0]).parent / "tokenizer"


def check_tokenizer(cfg: MegaKVConfig) -> None:
    from megakv.data.errors import DataError
    from megakv.data.tokenizer import read_info

    directory = tokenizer_dir(cfg)
    try:
        vocab = read_info(directory).vocab_size
    except DataError as e:
        raise ConfigError("data.tokenizer", cfg.data.tokenizer, e.problem, e.fix or "") from None
    if vocab > cfg.model.vocab_size:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"the tokenizer {directory} has {vocab} tokens, more than the model's embedding rows",
                          f"set model.vocab_size >= {vocab} (a multiple of 64 is faster)")


def _saved_section(state: TrainState, name: str, schema: type) -> dict:
    """One section of the config a checkpoint was written with, completed with today's defaults."""
    raw = OmegaConf.create(state.config_yaml).get(name, {})
    return asdict(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), raw)))


def check_same_model(cfg: MegaKVConfig, state: TrainState, where: Path) -> None:
    saved, ours = _saved_section(state, "model", ModelConfig), asdict(cfg.model)
    for name, value in ours.items():
        if saved.get(name) != value:
            raise ConfigError(f"model.{name}", value,
                              f"the checkpoint in {where} holds a model with {name}={saved.get(name)!r}",
                              "resume with the model settings of that run, or choose a new train.run_dir")


# The data settings that decide which samples a run reads; cache_dir and the validation sets do not.
DATA_IDENTITY_FIELDS = ("datasets", "weights", "tokenizer", "valid_fraction", "split_seed", "seed")


def _data_identity(data: dict) -> dict:
    def resolved(path):
        return None if path is None else str(Path(path).resolve())

    identity = {name: data.get(name) for name in DATA_IDENTITY_FIELDS}
    identity["datasets"] = [resolved(p) for p in identity["datasets"] or []]
    identity["tokenizer"] = resolved(identity["tokenizer"])
    return identity


def check_same_data(cfg: MegaKVConfig, state: TrainState, where: Path) -> None:
    """Refuse, before any process group, to resume on other data settings. (Changed file contents under the
    same settings are caught once the data is opened, by the data fingerprint.)"""
    saved = _data_identity(_saved_section(state, "data", DataConfig))
    ours = _data_identity(asdict(cfg.data))
    for name in DATA_IDENTITY_FIELDS:
        if saved[name] != ours[name]:
            raise ConfigError(f"data.{name}", getattr(cfg.data, name),
                              f"the checkpoint in {where} was trained with data.{name}={saved[name]!r}: resuming "
                              "on other data would not continue the same sample order",
                              "resume with that run's data settings, or choose a new train.run_dir")


def find_resume(cfg: MegaKVConfig, data_parallel: int) -> ResumePoint | None:
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = checkpoints_dir(run_dir)
    found = latest_checkpoint(ckpt_dir)
    if found is None:
        return None
    tag, state = found
    if cfg.checkpoint.resume == "none":
        raise ConfigError("checkpoint.resume", "none", f"{run_dir} already holds checkpoints (latest: {tag})",
                          "pass --resume auto to continue that run, or choose a new train.run_dir")
    check_same_model(cfg, state, ckpt_dir / tag)
    check_same_data(cfg, state, ckpt_dir / tag)
    if state.data_parallel == data_parallel:
        return ResumePoint(ckpt_dir, tag, state, universal=False)
    converted = universal_tag(tag)
    if read_pointer(ckpt_dir, LATEST_UNIVERSAL) == converted and (ckpt_dir / converted).is_dir():
        return ResumePoint(ckpt_dir, converted, state, universal=True)
    raise ConfigError("checkpoint.resume", "auto",
                      f"{ckpt_dir / tag} was written by {state.data_parallel} data-parallel ranks, this launch "
                      f"has {data_parallel}",
                      f"run `megakv-convert to-universal {run_dir}` first, or launch {state.data_parallel} ranks")


def check_pipeline(cfg: MegaKVConfig, accumulation: int) -> None:
    """The stage cut the user asked for exists; fewer micro-batches than stages leaves stages idle."""
    from megakv.parallel.partition import block_cuts

    if cfg.parallel.pipeline == 1:
        return
    block_cuts(cfg.model, cfg.parallel.pipeline, cfg.parallel.pipeline_partition)
    if accumulation < cfg.parallel.pipeline:
        warnings.warn(f"train.global_batch={cfg.train.global_batch} gives {accumulation} micro-batches per step "
                      f"for {cfg.parallel.pipeline} pipeline stages: most of each step is pipeline bubble; raise "
                      "train.global_batch (or lower train.micro_batch) to at least one micro-batch per stage",
                      stacklevel=2)


def check_same_pipeline(cfg: MegaKVConfig, resume: ResumePoint | None) -> None:
    saved = 1 if resume is None else int(resume.state.layout.get("pipeline", 1))
    if resume is not None and saved != cfg.parallel.pipeline:
        raise ConfigError("parallel.pipeline", cfg.parallel.pipeline,
                          f"the checkpoint {resume.path} was written by {saved} pipeline stages; resuming on "
                          "another pipeline layout is not supported yet",
                          f"resume with parallel.pipeline={saved}")


def preflight(cfg: MegaKVConfig, layout: ParallelLayout) -> Launch:
    check_device("train.device", cfg.train.device,
                 "use train.device=auto or cpu here, or launch where torch sees a GPU")
    tensor_split(cfg.model, cfg.parallel.tensor)  # the heads and MLP split over the tensor ranks
    data_parallel = cfg.parallel.validate_layout(layout.world_size)
    accumulation = gradient_accumulation_steps(cfg, data_parallel)
    check_pipeline(cfg, accumulation)
    cfg.data.validate("data")  # training needs data (a config that only describes a model may omit it)
    check_data_files(cfg)
    check_tokenizer(cfg)
    resume = find_resume(cfg, data_parallel)
    check_same_pipeline(cfg, resume)
    ds_config = build_ds_config(cfg, data_parallel, load_universal=bool(resume and resume.universal))
    return Launch(run_dir=Path(cfg.train.run_dir), data_parallel=data_parallel, accumulation_steps=accumulation,
                  ds_config=ds_config, resume=resume)
