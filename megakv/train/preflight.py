"""Launch-time checks: everything a config or a run directory can get wrong, before any process group.

Knows the world size from the launcher's environment (ParallelLayout), so it can check batch sizes and
the ZeRO stage against the layout, the data files, the tokenizer against the model, and whether the run
directory can be resumed (same model; same data-parallel size or a universal checkpoint).
"""

from __future__ import annotations

import os
import uuid
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf

from megakv.config import MegaKVConfig, flat_settings
from megakv.config.data import DataConfig
from megakv.config.devices import check_device, device_type, pinned_accelerator
from megakv.config.errors import ConfigError
from megakv.config.model import ModelConfig
from megakv.config.parallel import ParallelConfig
from megakv.parallel.layout import ParallelLayout
from megakv.parallel.tensor_split import tensor_split
from megakv.parallel.universal import is_layout_free, tensor_ready
from megakv.safe_load import first_link
from megakv.train.checkpoint import (
    LATEST_UNIVERSAL,
    CheckpointError,
    ResumePoint,
    discover,
    holds_checkpoints,
    read_pointer,
    step_tags,
    universal_tag,
    verify,
)
from megakv.train.ds_config import build_ds_config, gradient_accumulation_steps
from megakv.train.memory import check_activation_memory
from megakv.train.run_dir import LINK_FIX, LINK_PROBLEM, checkpoints_dir, read_status
from megakv.train.state import TrainState


@dataclass
class Launch:
    """What the launch-time checks decided; the trainer takes it from here."""

    run_dir: Path
    data_parallel: int
    accumulation_steps: int
    ds_config: dict
    resume: ResumePoint | None
    fresh_run_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    @property
    def run_id(self) -> str:
        """Carried over from the checkpoint on resume; new when starting fresh."""
        return self.resume.state.run_id if self.resume is not None else self.fresh_run_id


def check_cache_dir(cfg: MegaKVConfig) -> None:
    """The index cache (data.cache_dir, else index-cache/ beside the first dataset) can be created when it does
    not exist yet: a shared, read-only data directory failed only after the process group had started."""
    directory = Path(cfg.data.index_cache_dir)
    existing = next(p for p in (directory, *directory.parents) if p.exists())
    if existing != directory and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("data.cache_dir", cfg.data.cache_dir, f"the index cache {directory} does not exist yet "
                          f"and cannot be created ({existing} is not writable: a shared or read-only data directory?)",
                          "set data.cache_dir to a directory you can write (on a filesystem every rank sees)")


def check_data_files(cfg: MegaKVConfig) -> None:
    """Every pair exists, reads as an index (header, sizes) and holds tokens: --dry-run passed damaged or empty
    data that the launch refused after the process group."""
    from megakv.data.errors import DataError
    from megakv.data.indexed import IndexedDataset, bin_path, idx_path, pair_exists
    from megakv.data.metadata import read_meta
    from megakv.data.sft import check_prepared_window

    for name in ("datasets", "valid_datasets"):
        for i, prefix in enumerate(getattr(cfg.data, name)):
            field = f"data.{name}[{i}]"
            if not pair_exists(prefix):
                raise ConfigError(field, prefix,
                                  f"no prepared dataset: {bin_path(prefix)} and {idx_path(prefix)} must both exist",
                                  "give the prefix of a .bin/.idx pair written by megakv-prep (without suffix)")
            try:
                tokens = IndexedDataset(prefix).num_tokens
            except DataError as e:
                fix = e.fix or "prepare the dataset again with megakv-prep"
                raise ConfigError(field, prefix, e.problem, fix) from None
            if tokens == 0:
                raise ConfigError(field, prefix, "the dataset holds no tokens", "prepare it again from its text")
            try:  # QA records prepared for other windows: the launch refused them only after the process group
                check_prepared_window(prefix, cfg.seq_len, read_meta(prefix))
            except DataError as e:
                raise ConfigError("data.seq_len", cfg.seq_len, e.problem, e.fix) from None


def check_data_vocab(cfg: MegaKVConfig) -> None:
    """Token ids a dataset's metadata reports fit the model (after check_tokenizer, which names the usual cause)."""
    from megakv.data.metadata import read_meta

    for name in ("datasets", "valid_datasets"):
        for i, prefix in enumerate(getattr(cfg.data, name)):
            largest = (read_meta(prefix) or {}).get("max_token_id")
            if largest is not None and int(largest) >= cfg.model.vocab_size:
                raise ConfigError(f"data.{name}[{i}]", prefix, f"holds token id {largest}, outside the model's "
                                  f"vocabulary of {cfg.model.vocab_size}", "prepare it with the model's tokenizer, "
                                  "or raise model.vocab_size")


def tokenizer_dir(cfg: MegaKVConfig) -> Path:
    """data.tokenizer, or the tokenizer/ that data preparation saved beside the first dataset."""
    return Path(cfg.data.tokenizer) if cfg.data.tokenizer else Path(cfg.data.datasets[0]).parent / "tokenizer"


def check_tokenizer(cfg: MegaKVConfig) -> None:
    from megakv.data.errors import DataError
    from megakv.data.tokenizer import check_model_vocab, read_info

    directory = tokenizer_dir(cfg)
    try:
        vocab = read_info(directory).vocab_size
    except DataError as e:
        fix = e.fix or ""
        if cfg.data.tokenizer and (directory / "tokenizer.json").is_file():  # e.g. an imported model's tokenizer/
            beside = Path(cfg.data.datasets[0]).parent / "tokenizer"
            fix = (f"{directory} holds a Hugging Face tokenizer; training reads the megakv copy megakv-prep saved "
                   f"beside the data: leave data.tokenizer unset (that is {beside}), or import this one with "
                   "`megakv-tokenizer import`")
        raise ConfigError("data.tokenizer", cfg.data.tokenizer, e.problem, fix) from None
    try:
        check_model_vocab(cfg.model.vocab_size, vocab, directory)
    except DataError as e:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size, e.problem, e.fix) from None


def check_document_ends(cfg: MegaKVConfig) -> None:
    """data.reset_attention_mask / reset_position_ids find documents by their EOD token: on data whose
    documents do not end with it (Megatron's preprocess_data.py without --append-eod) they would do nothing."""
    from megakv.data.indexed import IndexedDataset, contains_token
    from megakv.data.tokenizer import read_info

    resets = [f"data.{name}" for name in ("reset_attention_mask", "reset_position_ids") if getattr(cfg.data, name)]
    if not resets:
        return
    eod = read_info(tokenizer_dir(cfg)).eos_id
    for name in ("datasets", "valid_datasets"):
        for i, prefix in enumerate(getattr(cfg.data, name)):
            if not contains_token(IndexedDataset(prefix), eod):
                raise ConfigError(f"data.{name}[{i}]", prefix,
                                  f"its sequences hold no end-of-document token ({eod}), so "
                                  f"{' and '.join(resets)} would find no document boundary (a Megatron pair "
                                  "prepared without --append-eod?)",
                                  "prepare it again with megakv-prep (or Megatron's --append-eod), or set "
                                  f"{'=false and '.join(resets)}=false")


def check_init_tokenizer(cfg: MegaKVConfig) -> None:
    """checkpoint.init_from's model must have been trained with the data's tokenizer: other token ids would make
    its weights meaningless without any error. Copies of one tokenizer agree (same files); different files
    that encode alike (e.g. a re-saved Hugging Face tokenizer) are accepted."""
    from megakv.data.tokenizer import encode_alike
    from megakv.model_dir import tokenizer_path

    if cfg.checkpoint.init_from is None:
        return
    model_tokenizer = tokenizer_path(cfg.checkpoint.init_from)
    if model_tokenizer is None:
        return  # the directory does not say which tokenizer it was trained with
    data_tokenizer = tokenizer_dir(cfg)
    if encode_alike(model_tokenizer, data_tokenizer) is False:  # None: unreadable, reported by the data checks
        raise ConfigError("checkpoint.init_from", cfg.checkpoint.init_from,
                          f"its model was trained with the tokenizer {model_tokenizer}, but the data was prepared "
                          f"with another one ({data_tokenizer}): the token ids would not mean what the weights "
                          "learned", f"prepare the data with the model's tokenizer (megakv-prep / megakv-qa prep "
                          f"--tokenizer {model_tokenizer}), or start from a model trained with {data_tokenizer}")


def check_init_weights(cfg: MegaKVConfig) -> None:
    """checkpoint.init_from's weights must be the model its config.yaml describes (names and shapes from the
    safetensors header, no weights read): found here, not as a traceback after the process group started."""
    from megakv.model_dir import WEIGHTS_FILE, check_weights_fit, safetensors_shapes

    if cfg.checkpoint.init_from is None:
        return
    weights = Path(cfg.checkpoint.init_from) / WEIGHTS_FILE
    try:
        check_weights_fit(cfg.model, safetensors_shapes(weights), str(weights))
    except (OSError, ValueError) as e:
        problem, _, fix = str(e).partition(" Fix: ")
        raise ConfigError("checkpoint.init_from", cfg.checkpoint.init_from, problem,
                          fix or "point checkpoint.init_from at a directory megakv-convert wrote") from None


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
MOVABLE_FIELDS = ("datasets", "tokenizer")  # paths: the same content elsewhere resumes


def _data_identity(data: dict) -> dict:
    def resolved(path):
        return None if path is None else str(Path(path).resolve())

    identity = {name: data.get(name) for name in DATA_IDENTITY_FIELDS}
    identity["datasets"] = [resolved(p) for p in identity["datasets"] or []]
    # Spelled out or left to its default (the tokenizer/ beside the first dataset): the same tokenizer.
    default_tokenizer = Path(identity["datasets"][0]).parent / "tokenizer" if identity["datasets"] else None
    identity["tokenizer"] = resolved(identity["tokenizer"] or default_tokenizer)
    weights = identity["weights"]  # only the proportions decide the blend: [1, 1] is [2, 2]
    identity["weights"] = None if weights is None else [round(w / sum(weights), 12) for w in weights]
    return identity


def _moved(saved: list | str | None, ours: list | str | None) -> bool:
    """Other paths for as many datasets (or another tokenizer path): possibly the same files moved."""
    if isinstance(saved, list) and isinstance(ours, list):
        return len(saved) == len(ours) and saved != ours
    return saved is not None and ours is not None and saved != ours


def check_same_data(cfg: MegaKVConfig, state: TrainState, where: Path) -> None:
    """Refuse, before any process group, to resume on other data settings. (Changed file contents under the
    same settings are caught once the data is opened, by the data fingerprint.)"""
    saved_data = _saved_section(state, "data", DataConfig)
    saved, ours = _data_identity(saved_data), _data_identity(asdict(cfg.data))
    for name in DATA_IDENTITY_FIELDS:
        if name in MOVABLE_FIELDS and _moved(saved[name], ours[name]):
            # The same files moved (a new filesystem, a renamed directory): the paths differ, the content may
            # not. The data's fingerprint, a hash of the content, decides once the data is opened.
            warnings.warn(f"data.{name} is at another path than in the checkpoint ({saved[name]!r} -> "
                          f"{ours[name]!r}); resuming if the content is the same (the data fingerprint is checked "
                          "when the data is opened)", stacklevel=2)
            continue
        if saved[name] != ours[name]:
            raise ConfigError(f"data.{name}", getattr(cfg.data, name),
                              f"the checkpoint in {where} was trained with data.{name}={saved[name]!r}: resuming "
                              "on other data would not continue the same sample order",
                              "resume with that run's data settings, or choose a new train.run_dir")
    # Records prepared again with other loss masks: the same samples, so only their masks tell (the launch
    # would refuse them too, after the process group).
    from megakv.data.metadata import loss_mask_change, loss_masks_fingerprint

    if problem := loss_mask_change(state.loss_mask_fingerprint, loss_masks_fingerprint(cfg.data.datasets)):
        raise ConfigError("data.datasets", cfg.data.datasets, f"{where}: {problem}",
                          "resume with the records prepared as that run had them, or choose a new train.run_dir")
    # The sample length, as resolved (data.seq_len, else the model's context, which check_same_model fixed).
    saved_seq_len = saved_data.get("seq_len") or cfg.model.max_seq_len
    if saved_seq_len != cfg.seq_len:
        raise ConfigError("data.seq_len", cfg.data.seq_len,
                          f"the checkpoint in {where} was trained on {saved_seq_len}-token samples, this launch "
                          f"asks for {cfg.seq_len}: resuming would not continue the same sample order",
                          f"resume with data.seq_len={saved_seq_len}, or start a new train.run_dir with "
                          "checkpoint.init_from")


# Settings that change what a resumed run computes: refused unless --allow-config-change. (model and data
# are always refused: the weights or the sample order would not continue.)
COMPUTE_FIELDS = ("train.global_batch", "routing.", "data.reset_attention_mask", "data.reset_position_ids")
# Settings that are not part of the run's identity: never reported as changes.
IGNORED_FIELDS = ("checkpoint.resume", "checkpoint.allow_config_change", "train.run_dir", "train.debug.", "model.",
                  "data.")


def config_changes(cfg: MegaKVConfig, state: TrainState) -> list[tuple[str, object, object]]:
    """(field, value in the checkpoint, value now) for every setting that differs from the checkpoint's."""
    schema = OmegaConf.structured(MegaKVConfig)
    saved = OmegaConf.to_container(OmegaConf.merge(schema, OmegaConf.create(state.config_yaml or "{}")))
    ours = OmegaConf.to_container(OmegaConf.merge(schema, OmegaConf.structured(cfg)))
    saved_flat, ours_flat = flat_settings(saved), flat_settings(ours)
    return [(name, saved_flat.get(name), value) for name, value in sorted(ours_flat.items())
            if saved_flat.get(name) != value and (name.startswith(COMPUTE_FIELDS) or
                                                  not name.startswith(IGNORED_FIELDS))]


def check_config_changes(cfg: MegaKVConfig, state: TrainState, where: Path, allow: bool) -> list[str]:
    """Refuse changes to what the run computes (unless allowed); describe every change for the log."""
    described = []
    for name, before, now in config_changes(cfg, state):
        # With a plan per micro-batch, the micro-batch size sets how many plans a step draws.
        computes = name.startswith(COMPUTE_FIELDS) or (name == "train.micro_batch" and cfg.routing.per_micro_batch)
        if computes and not allow:
            raise ConfigError(name, now, f"the checkpoint in {where} was trained with {name}={before!r}; resuming "
                              "with another value changes what the run computes",
                              f"resume with {name}={before!r}, pass --allow-config-change to continue with the new "
                              "value (it is recorded in the log), or choose a new train.run_dir")
        described.append(f"{name}: {before!r} -> {now!r}" + (" (allowed by --allow-config-change)" if computes
                                                              else ""))
    return described


def stage_cuts(cfg: MegaKVConfig, saved_pipeline: int, saved_parallel: dict) -> tuple[list[int], list[int]]:
    """(the checkpoint's pipeline cut, this launch's), equal when there is nothing to compare."""
    from megakv.parallel.partition import block_cuts

    if saved_pipeline != cfg.parallel.pipeline or saved_pipeline == 1:
        return [], []
    saved = block_cuts(cfg.model, saved_pipeline, saved_parallel.get("pipeline_partition", "uniform"))
    return saved, block_cuts(cfg.model, cfg.parallel.pipeline, cfg.parallel.pipeline_partition)


def saved_zero_stage(cfg: MegaKVConfig, state: TrainState, where: Path) -> int:
    """The checkpoint's ZeRO stage. Another stage goes through a universal conversion, like another layout,
    between stages 1 and 2; DeepSpeed's stage-3 shards and its stage-3 universal files differ in kind, so a
    move to or from stage 3 is refused."""
    saved = int(state.layout.get("zero_stage", cfg.parallel.zero_stage))
    if saved != cfg.parallel.zero_stage and 3 in (saved, cfg.parallel.zero_stage):
        raise ConfigError("parallel.zero_stage", cfg.parallel.zero_stage,
                          f"the checkpoint in {where} was written with ZeRO stage {saved}; DeepSpeed cannot move "
                          "a run's optimizer state to or from stage 3",
                          f"resume with parallel.zero_stage={saved}, or export the weights (megakv-convert "
                          "from-checkpoint) and start a new train.run_dir with checkpoint.init_from")
    return saved


def find_resume(cfg: MegaKVConfig, data_parallel: int, rank: int = 0, world_size: int = 1) -> ResumePoint | None:
    """Where this launch starts: None (fresh: nothing in checkpoints/) or the newest intact checkpoint.

    Rank 0 checks every file's checksum, the other ranks only their sizes: each rank reading the whole checkpoint
    read it world-size times from a shared filesystem before training. A damage only the checksums show, which
    would make the ranks choose different checkpoints, stops the launch instead (rank 0 names it)."""
    checksums = rank == 0
    run_dir = Path(cfg.train.run_dir)
    ckpt_dir = checkpoints_dir(run_dir)
    if not holds_checkpoints(ckpt_dir):
        status = read_status(run_dir) if cfg.checkpoint.resume == "none" else None
        if status is not None and status.get("state") in ("finished", "preempted", "diverged"):
            # a run that saved nothing (checkpoint.save_final=false): its config.yaml and metrics.jsonl would be
            # replaced; `--resume auto` restarts it from scratch on purpose (a requeue before the first save)
            raise ConfigError("checkpoint.resume", "none", f"{run_dir} holds a run that {status['state']} "
                              "(status.json) without a checkpoint; starting fresh would write over its config.yaml "
                              "and metrics",
                              "choose a new train.run_dir, or pass --resume auto to start that run again from scratch")
        return None
    if cfg.checkpoint.resume == "none":
        tags = step_tags(ckpt_dir)
        shown = f"{len(tags)} checkpoint(s), newest {tags[-1]}" if tags else "a `latest` pointer"
        raise ConfigError("checkpoint.resume", "none", f"{run_dir} already holds {shown}; starting fresh would "
                          "write over them",
                          "pass --resume auto to continue that run, or choose a new train.run_dir")
    found = discover(ckpt_dir, checksums)
    if checksums and world_size > 1 and found.found != (sized := discover(ckpt_dir, checksums=False)).found:
        damaged = sized.found[0] if sized.found else "?"
        problem = next((p for p in found.damaged if p.startswith(f"{damaged}:")), "; ".join(found.damaged))
        raise CheckpointError(f"{ckpt_dir / damaged} is damaged ({problem}) although its files have the sizes "
                              "recorded, so only rank 0, which checks checksums, can tell. Fix: move it aside "
                              f"(mv {ckpt_dir / damaged} {ckpt_dir / damaged}.damaged) and launch again: the run "
                              "resumes from the newest intact checkpoint")
    notices = [f"DAMAGED CHECKPOINT passed over: {problem}. Resuming from an older one; the damaged directory "
               "is kept (moved aside when this run saves that step again)" for problem in found.damaged]
    notices.extend(found.notes)
    if found.found is None:
        raise CheckpointError(f"{ckpt_dir} holds checkpoints but none is intact: " + "; ".join(found.damaged)
                              + ". Fix: restore a good copy of one of them, or choose a new train.run_dir")
    tag, state = found.found
    where = ckpt_dir / tag
    check_same_model(cfg, state, where)
    check_same_data(cfg, state, where)
    saved_stage = saved_zero_stage(cfg, state, where)
    if state.step > cfg.train.steps:  # a shorter run cannot be continued from a longer one's checkpoint
        raise ConfigError("train.steps", cfg.train.steps, f"the checkpoint in {where} is at step {state.step}, "
                          "past the end of this run", f"resume with train.steps >= {state.step}, or start a new "
                          "train.run_dir with checkpoint.init_from")
    changes = tuple(check_config_changes(cfg, state, where, cfg.checkpoint.allow_config_change))
    saved_pipeline, saved_tensor = int(state.layout.get("pipeline", 1)), int(state.layout.get("tensor", 1))
    # Each stage's optimizer shard holds its own blocks: another cut of the same number of stages is another layout.
    saved_cuts, cuts = stage_cuts(cfg, saved_pipeline, _saved_section(state, "parallel", ParallelConfig))
    if (state.data_parallel, saved_pipeline, saved_tensor, saved_stage, saved_cuts) == (
            data_parallel, cfg.parallel.pipeline, cfg.parallel.tensor, cfg.parallel.zero_stage, cuts):
        return ResumePoint(ckpt_dir, tag, state, universal=False, notices=tuple(notices), config_changes=changes)
    converted = universal_tag(tag)
    problem = (f"{ckpt_dir / tag} was written by {state.data_parallel} data-parallel rank(s) x {saved_pipeline} "
               f"pipeline stage(s) x tensor degree {saved_tensor} at ZeRO stage {saved_stage}, this launch has "
               f"{data_parallel} x {cfg.parallel.pipeline} x {cfg.parallel.tensor} at stage {cfg.parallel.zero_stage}"
               + (f" (stages cut at blocks {saved_cuts}, now {cuts})" if saved_cuts != cuts else ""))
    same_layout = (f"launch {state.data_parallel * saved_pipeline * saved_tensor} processes with "
                   f"parallel.pipeline={saved_pipeline} parallel.tensor={saved_tensor} "
                   f"parallel.zero_stage={saved_stage} (the layout that wrote it)")
    if saved_stage == 3:
        # DeepSpeed 0.19's ZeRO-3 universal load gives every parameter group one shared Adam step counter (it
        # advances once per group each step) and the first group's settings (weight decay on the norms).
        raise ConfigError("checkpoint.resume", "auto",
                          f"{problem}; DeepSpeed cannot load a ZeRO-3 optimizer state into another layout intact "
                          "(its step count and per-group weight decay come out wrong), so the run would go on "
                          "training another model",
                          f"{same_layout}, or export the weights (`megakv-convert from-checkpoint {run_dir} DIR`) "
                          "and start a new train.run_dir with checkpoint.init_from=DIR (the optimizer starts afresh)")
    if read_pointer(ckpt_dir, LATEST_UNIVERSAL) != converted or not (ckpt_dir / converted).is_dir():
        raise ConfigError("checkpoint.resume", "auto", problem,
                          f"run `megakv-convert to-universal {run_dir}` first, or {same_layout}")
    if not is_layout_free(ckpt_dir / converted):
        raise ConfigError("checkpoint.resume", "auto",
                          f"{problem}; its conversion {ckpt_dir / converted} does not hold the parameters under "
                          "MegaKVModel names (an older or partial conversion)",
                          f"run `megakv-convert to-universal {run_dir}` again, or {same_layout}")
    damage = verify(ckpt_dir / converted, checksums=rank == 0)  # an error, not a choice: ranks cannot diverge
    if damage is not None:  # a missing or changed file: DeepSpeed would crash on it or train from it silently
        raise ConfigError("checkpoint.resume", "auto", f"{problem}; its conversion is damaged: {damage}",
                          f"run `megakv-convert to-universal {run_dir}` again, or {same_layout}")
    made_from = TrainState.read(ckpt_dir / converted).converted_from
    if made_from and made_from != state.manifest_digest():  # the step was saved again after the conversion
        raise ConfigError("checkpoint.resume", "auto",
                          f"{problem}; its conversion {ckpt_dir / converted} was made from an earlier checkpoint "
                          f"saved as {tag}, not the one there now (it would resume another model)",
                          f"run `megakv-convert to-universal {run_dir}` again, or {same_layout}")
    return ResumePoint(ckpt_dir, converted, state, universal=True, notices=tuple(notices), config_changes=changes)


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


def check_plans_layout(cfg: MegaKVConfig, data_parallel: int) -> None:
    """Per-micro-batch plans differ across data-parallel ranks (each micro-batch gets its global slot's
    plan); ZeRO-3 gathers each module's weights collectively and needs every rank to call the same ones."""
    if cfg.routing.per_micro_batch and cfg.parallel.zero_stage == 3 and data_parallel > 1:
        raise ConfigError("routing.per_micro_batch", True,
                          f"with ZeRO-3 and {data_parallel} data-parallel ranks the ranks' micro-batches run "
                          "different routing plans, which ZeRO-3's collective parameter gathering cannot follow",
                          "use parallel.zero_stage=1 or 2 with per-micro-batch plans, or routing.per_micro_batch="
                          "false (one plan per step)")


def check_same_tensor(cfg: MegaKVConfig, resume: ResumePoint | None) -> None:
    """A universal checkpoint resumes with tensor parallelism when DeepSpeed's cut (each tensor in T pieces
    along the recorded split dimension; a K/V tensor already of the shard's shape copied whole) is
    megakv's split: not when several K/V heads are each replicated on several ranks."""
    if resume is None or not resume.universal or cfg.parallel.tensor == 1:
        return
    saved = int(resume.state.layout.get("tensor", 1))
    fix = (f"resume with parallel.tensor=1 (any data/pipeline layout), or on the layout that wrote it "
           f"(parallel.tensor={saved}, {resume.state.data_parallel} data-parallel rank(s))")
    split = tensor_split(cfg.model, cfg.parallel.tensor)
    if split.kv_replicas > 1 and cfg.model.n_kv_heads > 1:
        raise ConfigError("parallel.tensor", cfg.parallel.tensor,
                          f"resuming the universal checkpoint {resume.path} with {cfg.model.n_kv_heads} K/V heads "
                          f"each replicated on {split.kv_replicas} tensor ranks is not supported yet", fix)
    if not tensor_ready(resume.path):
        raise ConfigError("parallel.tensor", cfg.parallel.tensor,
                          f"the universal checkpoint {resume.path} does not record megakv's split dimensions (an "
                          "older conversion)",
                          f"run `megakv-convert to-universal {cfg.train.run_dir}` again, or {fix}")


def check_run_dir(cfg: MegaKVConfig) -> None:
    """The run directory (and its checkpoints/) must be a directory, or creatable: said now, not as a traceback
    after the other ranks started waiting."""
    run_dir = Path(cfg.train.run_dir)
    for path in (run_dir, checkpoints_dir(run_dir)):
        if path.exists() and not path.is_dir():
            raise ConfigError("train.run_dir", str(run_dir), f"{path} exists and is not a directory",
                              "choose another train.run_dir")
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError("train.run_dir", str(run_dir), f"cannot create or write it ({existing} is not a "
                          "writable directory)", "choose a train.run_dir you can write")
    link = first_link(run_dir) if run_dir.is_dir() else None
    if link is not None:
        raise ConfigError("train.run_dir", str(run_dir), f"{link} is a link: {LINK_PROBLEM}", LINK_FIX)


def check_device_pairing(cfg: MegaKVConfig, local_rank: int) -> None:
    """The device, DeepSpeed's accelerator and the process-group backend must agree: each mismatch fails only at
    the first forward or collective otherwise (a model on the GPU fed from the CPU, NCCL on CPU tensors)."""
    device, pinned = device_type(cfg.train.device), pinned_accelerator()
    if pinned not in (None, device):
        raise ConfigError("train.device", cfg.train.device, f"the run would use the {device} while DS_ACCELERATOR="
                          f"{pinned} puts DeepSpeed's engine on {pinned}",
                          f"unset DS_ACCELERATOR (or set it to {device}), or choose the other train.device")
    backend = cfg.parallel.backend
    if backend == "nccl" and device == "cpu":
        raise ConfigError("parallel.backend", backend, "NCCL runs on GPUs only and this run is on the CPU",
                          "use parallel.backend=auto (gloo on the CPU)")
    if backend == "gloo" and device == "cuda":
        raise ConfigError("parallel.backend", backend, "gloo cannot all-gather, reduce-scatter or send GPU tensors, "
                          "which ZeRO and the pipeline do", "use parallel.backend=auto (NCCL on GPUs)")
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    if gpus > 1 and local_rank >= gpus:
        raise ConfigError("train.device", cfg.train.device, f"this process is local rank {local_rank} but sees "
                          f"{gpus} GPUs: two ranks would share one", "start at most one process per GPU on a node "
                          "(GPUS_PER_NODE with slurm/pretrain.sbatch, torchrun --nproc_per_node)")


def preflight(cfg: MegaKVConfig, layout: ParallelLayout) -> Launch:
    check_device("train.device", cfg.train.device,
                 "use train.device=auto or cpu here, or launch where torch sees a GPU")
    check_device_pairing(cfg, layout.local_rank)
    tensor_split(cfg.model, cfg.parallel.tensor)  # the heads and MLP split over the tensor ranks
    data_parallel = cfg.parallel.validate_layout(layout.world_size)
    accumulation = gradient_accumulation_steps(cfg, data_parallel)
    check_pipeline(cfg, accumulation)
    check_plans_layout(cfg, data_parallel)
    cfg.data.validate("data")  # training needs data (a config that only describes a model may omit it)
    check_data_files(cfg)
    check_cache_dir(cfg)
    check_tokenizer(cfg)
    check_data_vocab(cfg)
    check_document_ends(cfg)
    check_init_tokenizer(cfg)
    memory_note = check_activation_memory(cfg, layout.local_rank)
    if memory_note and layout.rank == 0:
        warnings.warn(memory_note, stacklevel=2)
    check_run_dir(cfg)
    resume = find_resume(cfg, data_parallel, layout.rank, layout.world_size)
    if resume is None:  # a resume takes the weights from its checkpoint (init_from may be gone by then)
        check_init_weights(cfg)
    check_same_tensor(cfg, resume)
    ds_config = build_ds_config(cfg, data_parallel, load_universal=bool(resume and resume.universal))
    return Launch(run_dir=Path(cfg.train.run_dir), data_parallel=data_parallel, accumulation_steps=accumulation,
                  ds_config=ds_config, resume=resume)
