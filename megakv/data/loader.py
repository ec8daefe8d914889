"""What the training loop calls: build_data, micro_batches, valid_batches.

The train stream is one global order of samples. Step s of a run with global batch B consumes samples
[s*B, (s+1)*B) of it and data-parallel rank r takes the r-th contiguous slice of that range, so the
samples of a step do not depend on the number of ranks, and the whole data position is the number of
consumed samples plus `Data.fingerprint` (resuming on different data is refused).

No module-level state: the caller passes `is_builder` (the one process, usually global rank 0, that
builds the on-disk sample-order cache) and a `barrier` callable (e.g. torch.distributed.barrier).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megakv.config.data import DataConfig
from megakv.data.blend import BlendedSamples
from megakv.data.cache import IndexCache
from megakv.data.errors import DataError
from megakv.data.indexed import IndexedDataset
from megakv.data.metadata import (
    dataset_identity,
    loss_mask_change,
    loss_masks_fingerprint,
    read_meta,
    token_id_bound,
)
from megakv.data.orders import WHOLE, OrderPlan, Source, alignment_key
from megakv.data.samples import GPTSamples
from megakv.data.sft import attach_loss_mask, inputs_and_labels
from megakv.data.tokenizer import TokenizerInfo, check_model_vocab, read_info

FINGERPRINT_VERSION = 1


@dataclass
class Data:
    train: BlendedSamples
    valid: BlendedSamples | None  # every held-out sample, interleaved evenly across sources
    valid_sets: dict[str, GPTSamples]  # the same, per source (for per-source validation losses)
    fingerprint: str
    tokenizer_dir: Path
    tokenizer: TokenizerInfo
    seq_len: int
    cache_dir: Path
    built_cache_entries: int = 0  # how many cache entries this process built (0 unless is_builder)
    sources: list[str] = field(default_factory=list)
    # The training sets' loss masks ("" without any). Apart from `fingerprint`, so that checkpoints of
    # masked data written before it existed still resume; one re-prepared with other masks does not.
    loss_mask_fingerprint: str = ""

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_id

    @property
    def pad_id(self) -> int | None:
        return self.tokenizer.pad_id

    def check_validation(self, every: int) -> None:
        """Validation asked for (validation.every > 0) with no held-out sample: not a run validating on nothing."""
        if every and self.valid is None:
            held = ", ".join(f"{name}: {len(part)}" for name, part in self.valid_sets.items()) or "none"
            raise DataError(f"validation.every={every} but the data holds no validation sample of seq_len + 1 = "
                            f"{self.seq_len + 1} tokens (held-out samples per dataset: {held}; a dataset of fewer "
                            "than 2 documents holds none out)",
                            "raise data.valid_fraction, list data.valid_datasets, or set validation.every=0")

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Refuse a model with fewer embedding rows than the data's tokenizer has tokens."""
        check_model_vocab(model_vocab_size, self.vocab_size, self.tokenizer_dir)

    def resume_state(self, consumed_samples: int) -> dict:
        """The whole data position of a checkpoint."""
        return {"consumed_samples": int(consumed_samples), "data_fingerprint": self.fingerprint,
                "loss_mask_fingerprint": self.loss_mask_fingerprint}

    def check_resume(self, state: dict, checkpoint: str | Path | None = None,
                     run_dir: str | Path | None = None) -> int:
        """Consumed samples to resume from (`state` as resume_state wrote it); refuses a checkpoint made on other
        data or another order, or with other loss masks. `checkpoint` names it in the message; with `run_dir`
        (the run it belongs to) the fix says how to keep its weights in a new run."""
        which = "the checkpoint" if checkpoint is None else f"the checkpoint {checkpoint}"
        otherwise = ("start a new run" if run_dir is None else
                     f"keep its weights with `megakv-convert from-checkpoint {run_dir} MODEL_DIR` and train in a new "
                     "run_dir with checkpoint.init_from=MODEL_DIR")
        if state.get("data_fingerprint") != self.fingerprint:
            raise DataError(f"the data fingerprint {state.get('data_fingerprint')} of {which} differs from this "
                            f"run's {self.fingerprint}: the datasets, weights, seed, seq_len or split changed, or the "
                            "megakv that wrote it cut them into samples otherwise (before 2026-12-07, QA records "
                            "lost one sample per file)",
                            f"resume with the data config of that run; else {otherwise}")
        if problem := self.loss_mask_change(state.get("loss_mask_fingerprint", "")):
            raise DataError(problem if checkpoint is None else f"{checkpoint}: {problem}",
                            f"prepare the records again as that run had them; else {otherwise}")
        return int(state["consumed_samples"])

    def loss_mask_change(self, saved: str) -> str | None:
        """What is wrong when a checkpoint's loss masks are not this data's (metadata.loss_mask_change)."""
        return loss_mask_change(saved, self.loss_mask_fingerprint)


def _open_source(prefix: str, tokenizer: TokenizerInfo, tokenizer_dir: Path) -> Source:
    dataset = IndexedDataset(prefix)  # raises on a missing, truncated or mismatched pair
    meta = read_meta(prefix)
    made_with = ((meta or {}).get("tokenizer") or {}).get("fingerprint")
    if made_with is not None and made_with != tokenizer.fingerprint:
        raise DataError(f"{prefix} was tokenized with another tokenizer than {tokenizer_dir} "
                        f"(fingerprint {made_with[:12]} vs {tokenizer.fingerprint[:12]})",
                        "point data.tokenizer at the tokenizer/ directory saved beside that dataset, "
                        "or prepare every dataset with one tokenizer")
    bound = token_id_bound(dataset, meta)
    if bound >= tokenizer.vocab_size:
        raise DataError(f"{prefix} holds token id {bound}, outside the vocabulary of {tokenizer.vocab_size} "
                        f"of {tokenizer_dir}",
                        "use the tokenizer the dataset was prepared with, or re-prepare the dataset")
    return Source(Path(prefix), dataset, dataset_identity(prefix))


def _tokenizer_of(cfg: DataConfig) -> tuple[Path, TokenizerInfo]:
    directory = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.datasets[0]).parent / "tokenizer"
    if not directory.is_dir():
        raise DataError(f"tokenizer directory {directory} not found",
                        "set data.tokenizer, or keep the tokenizer/ that megakv-prep saved beside the data")
    return directory, read_info(directory)


def _unique_name(name: str, taken: dict) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}#{n}"
    return candidate


def build_data(cfg: DataConfig, seq_len: int, *, is_builder: bool, barrier: Callable[[], None] | None = None,
               train_samples: int | None = None, wait_timeout_s: float = 3600.0) -> Data:
    """Open, check and index the data of `cfg` for samples of seq_len + 1 tokens.

    Every process calls this. The builder writes the sample orders into the cache (splits, the epochs
    the run needs, validation orders) while the others wait on `barrier` (or, without one, poll the
    cache directory). `train_samples` (steps x global batch), if known, makes the builder prepare every
    epoch the run will use; later epochs are computed on demand, identically.
    Raises DataError, before any training, for missing / truncated / mismatched pairs, data made with
    another tokenizer, token ids outside the vocabulary, or splits too small for seq_len.
    """
    cfg.validate()
    if seq_len < 1:
        raise DataError(f"seq_len must be positive, got {seq_len}", "set data.seq_len (or model.max_seq_len)")
    tokenizer_dir, tokenizer = _tokenizer_of(cfg)
    train_sources = [_open_source(p, tokenizer, tokenizer_dir) for p in cfg.datasets]
    valid_sources = [_open_source(p, tokenizer, tokenizer_dir) for p in cfg.valid_datasets]
    for source in train_sources + valid_sources:  # QA records: only answer tokens count (megakv/data/sft.py)
        attach_loss_mask(source, seq_len, read_meta(source.prefix))
    cache = IndexCache(cfg.index_cache_dir, verify=is_builder)
    plan = OrderPlan(cfg, seq_len, cache)

    error: Exception | None = None
    if is_builder:
        try:
            plan.build(train_sources, valid_sources, train_samples)
        except Exception as e:  # still reach the barrier, or the other ranks would wait forever
            error = e
    if barrier is not None:
        barrier()
    if error is not None:
        raise error
    if not is_builder and barrier is None:
        cache.wait_for([plan.split_key(s) for s in train_sources], wait_timeout_s)

    splits = []
    for source in train_sources:
        split = plan.load_split(source)
        if split is None:
            raise DataError(f"the index cache entry for {source.prefix} is missing from {cache.directory} after "
                            "the builder finished",
                            "put data.cache_dir on a filesystem every rank sees, or make one process per node "
                            "a builder (is_builder = local_rank == 0)")
        if plan.samples_per_epoch(source, split.train) == 0:
            raise DataError(f"the training split of {source.prefix} has {plan.tokens_of(source, split.train)} "
                            f"tokens, fewer than seq_len + 1 = {seq_len + 1}",
                            "add data, or lower data.seq_len or data.valid_fraction")
        splits.append(split)

    train_parts = [plan.train_part(s, split) for s, split in zip(train_sources, splits)]
    counts = plan.blend_counts([len(p) for p in train_parts], [str(s.prefix) for s in train_sources])
    valid_sets: dict[str, GPTSamples] = {}
    for source, split in zip(train_sources, splits):
        if len(split.valid):
            valid_sets[_unique_name(source.name, valid_sets)] = plan.valid_part(source, split.key, split.valid)
    for source in valid_sources:
        docs = np.arange(len(source.dataset), dtype=np.int64)
        if plan.samples_per_epoch(source, docs) == 0:  # listed for validation, yet it would validate on nothing
            raise DataError(f"the validation dataset (data.valid_datasets) {source.prefix} has "
                            f"{plan.tokens_of(source, docs)} tokens in {len(docs)} documents, fewer than one sample "
                            f"of seq_len + 1 = {seq_len + 1}", "validate on a larger dataset, or lower data.seq_len")
        valid_sets[_unique_name(source.name, valid_sets)] = plan.valid_part(source, WHOLE, docs)

    description = {"version": FINGERPRINT_VERSION, "seq_len": seq_len, "seed": cfg.seed,
                   "tokenizer": tokenizer.fingerprint,
                   "train": [{"dataset": s.identity, "split": split.key, "count": c, **alignment_key(s)}
                             for s, split, c in zip(train_sources, splits, counts)]}
    fingerprint = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:20]
    mask_fingerprint = loss_masks_fingerprint([s.prefix for s in train_sources])
    for part in [*train_parts, *valid_sets.values()]:
        part.vocab_size = tokenizer.vocab_size  # every sample read is checked against it
    nonempty_valid = [v for v in valid_sets.values() if len(v)]
    valid = (BlendedSamples(nonempty_valid, [len(v) for v in nonempty_valid], repeat=False)
             if nonempty_valid else None)
    return Data(train=BlendedSamples(train_parts, counts, repeat=True), valid=valid, valid_sets=valid_sets,
                fingerprint=fingerprint, tokenizer_dir=tokenizer_dir, tokenizer=tokenizer, seq_len=seq_len,
                cache_dir=cache.directory, built_cache_entries=cache.built,
                sources=[str(s.prefix) for s in train_sources], loss_mask_fingerprint=mask_fingerprint)


def micro_batches(dataset, consumed_samples: int, global_batch: int, micro_batch: int, dp_rank: int,
                  dp_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro batches of the step that starts after `consumed_samples` samples.

    The step covers global samples [consumed, consumed + global_batch); rank r takes the r-th of dp_size
    contiguous slices, cut into micro batches. Returns (inputs, labels) pairs, each (micro_batch, seq_len).
    """
    if global_batch % (micro_batch * dp_size):
        raise DataError(f"global batch {global_batch} is not a multiple of micro_batch x dp_size = "
                        f"{micro_batch} x {dp_size}", "choose a global batch divisible by micro_batch * dp_size")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank {dp_rank} outside [0, {dp_size})")
    per_rank = global_batch // dp_size
    first = consumed_samples + dp_rank * per_rank
    batches = []
    for m in range(per_rank // micro_batch):
        start = first + m * micro_batch
        block = torch.from_numpy(np.stack([dataset[i] for i in range(start, start + micro_batch)]))
        batches.append(inputs_and_labels(block))
    return batches


def valid_batches(dataset, batch_size: int, max_batches: int | None = None, dp_rank: int = 0, dp_size: int = 1
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches in a fixed order: batch b is samples [b*B, (b+1)*B), rank r takes its slice.

    Only whole batches are used, so every rank gets the same number of batches.
    """
    if batch_size % dp_size:
        raise DataError(f"eval batch {batch_size} is not a multiple of dp_size {dp_size}",
                        "choose an eval batch divisible by the data-parallel size")
    if dataset is None or len(dataset) < batch_size:
        raise DataError(f"the validation set has {0 if dataset is None else len(dataset)} samples, fewer than "
                        f"one batch of {batch_size}",
                        "lower the eval batch size, or hold out more data (data.valid_fraction / valid_datasets)")
    count = len(dataset) // batch_size
    if max_batches is not None:
        count = min(count, max_batches)
    per_rank = batch_size // dp_size
    for b in range(count):
        start = b * batch_size + dp_rank * per_rank
        block = torch.from_numpy(np.stack([dataset[i] for i in range(start, start + per_rank)]))
        yield inputs_and_labels(block)
