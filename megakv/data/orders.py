"""Which sample orders a data config needs, how each is described (its cache key), built and loaded.

Entries in the cache, per training dataset: its document split, one entry per train epoch, its
validation order; per extra validation dataset: its validation order. Each description names the
dataset by content identity, so the cache can be shared by many runs and never serves stale orders.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from megakv.config.data import DataConfig
from megakv.data.blend import counts_from_weights
from megakv.data.cache import IndexCache, cache_key
from megakv.data.indexed import IndexedDataset
from megakv.data.samples import (
    EpochOrder,
    GPTSamples,
    salt_of,
    samples_in,
    split_documents,
    train_epoch_order,
    valid_order,
)

MAX_PREBUILT_EPOCHS = 256  # later epochs are computed in memory on demand (same result, not cached)
WHOLE = "all"  # split key of a dataset used whole (an extra validation dataset)


@dataclass
class Source:
    prefix: Path
    dataset: IndexedDataset
    identity: str  # content hash (metadata.dataset_identity)
    record_aligned: bool = False  # QA records of seq_len tokens with a loss mask: one sample per record

    @property
    def salt(self) -> int:
        return salt_of(self.identity)

    @property
    def name(self) -> str:
        return self.prefix.name


def alignment_key(source: Source) -> dict:
    # Only record-aligned sources say so: the cache keys and data fingerprints of plain data stay what they were.
    return {"record_aligned": True} if source.record_aligned else {}


@dataclass
class Split:
    key: str
    train: np.ndarray
    valid: np.ndarray


class OrderPlan:
    def __init__(self, cfg: DataConfig, seq_len: int, cache: IndexCache):
        self.cfg, self.seq_len, self.cache = cfg, seq_len, cache

    # -- descriptions (= cache keys)
    def split_description(self, source: Source) -> dict:
        return {"kind": "split", "dataset": source.identity, "valid_fraction": self.cfg.valid_fraction,
                "split_seed": self.cfg.split_seed}

    def epoch_description(self, source: Source, split_key: str, epoch: int) -> dict:
        return {"kind": "train-epoch", "dataset": source.identity, "split": split_key, "seq_len": self.seq_len,
                "seed": self.cfg.seed, "epoch": epoch, **alignment_key(source)}

    def valid_description(self, source: Source, split_key: str) -> dict:
        return {"kind": "valid", "dataset": source.identity, "split": split_key, "seq_len": self.seq_len,
                "split_seed": self.cfg.split_seed, **alignment_key(source)}

    def split_key(self, source: Source) -> str:
        return cache_key(self.split_description(source))

    # -- pure computations
    def compute_split(self, source: Source) -> dict[str, np.ndarray]:
        train, valid = split_documents(len(source.dataset), self.cfg.valid_fraction, self.cfg.split_seed,
                                       source.salt)
        return {"train": train, "valid": valid}

    def tokens_of(self, source: Source, docs: np.ndarray) -> int:
        return int(source.dataset.lengths[docs].sum(dtype=np.int64))

    def samples_per_epoch(self, source: Source, docs: np.ndarray) -> int:
        return samples_in(self.tokens_of(source, docs), self.seq_len, source.record_aligned)

    def blend_counts(self, samples_per_epoch: list[int], names: list[str] | None = None) -> list[int]:
        """Samples of each training dataset per blend block (see blend.py)."""
        if len(samples_per_epoch) == 1:
            return [1]
        if self.cfg.weights is not None:
            return counts_from_weights(self.cfg.weights, names=names)
        return counts_from_weights(samples_per_epoch, names=names, from_sizes=True)

    def compute_epoch(self, source: Source, docs: np.ndarray, epoch: int) -> EpochOrder:
        return train_epoch_order(source.dataset.lengths, docs, self.seq_len, self.cfg.seed, source.salt, epoch,
                                 source.record_aligned)

    def compute_valid(self, source: Source, docs: np.ndarray) -> EpochOrder:
        return valid_order(source.dataset.lengths, docs, self.seq_len, self.cfg.split_seed, source.salt,
                           source.record_aligned)

    # -- cache
    def load_split(self, source: Source) -> Split | None:
        key = self.split_key(source)
        if not self.cache.has(key):
            return None
        arrays = self.cache.load(key)
        return Split(key, np.asarray(arrays["train"]), np.asarray(arrays["valid"]))

    def _cached(self, description: dict, compute) -> EpochOrder:
        key = cache_key(description)
        return EpochOrder(**self.cache.load(key)) if self.cache.has(key) else compute()

    def _ensure(self, description: dict, compute: Callable[[], EpochOrder]) -> None:
        self.cache.get_or_build(cache_key(description), description, lambda: compute().arrays(), may_build=True)

    def build(self, train_sources: list[Source], valid_sources: list[Source], train_samples: int | None) -> None:
        """Builder only: write every entry the run needs (entries already present are kept)."""
        splits = []
        for source in train_sources:
            self.cache.get_or_build(self.split_key(source), self.split_description(source),
                                    partial(self.compute_split, source), may_build=True)
            splits.append(self.load_split(source))
        spe = [self.samples_per_epoch(s, split.train) for s, split in zip(train_sources, splits)]
        if min(spe) == 0:
            return  # build_data reports the too-small split with a clear message
        counts = self.blend_counts(spe)
        block = sum(counts)
        for source, split, n, count in zip(train_sources, splits, spe, counts):
            needed = 1 if train_samples is None else math.ceil(math.ceil(train_samples / block) * count / n)
            for epoch in range(max(1, min(needed, MAX_PREBUILT_EPOCHS))):
                self._ensure(self.epoch_description(source, split.key, epoch),
                             partial(self.compute_epoch, source, split.train, epoch))
            if len(split.valid):
                self._ensure(self.valid_description(source, split.key),
                             partial(self.compute_valid, source, split.valid))
        for source in valid_sources:
            self._ensure(self.valid_description(source, WHOLE),
                         partial(self.compute_valid, source, np.arange(len(source.dataset), dtype=np.int64)))

    # -- sample sets
    def train_part(self, source: Source, split: Split) -> GPTSamples:
        def epoch_order(e: int) -> EpochOrder:
            return self._cached(self.epoch_description(source, split.key, e),
                                lambda: self.compute_epoch(source, split.train, e))

        return GPTSamples(f"{source.name}[train]", source.dataset, self.seq_len,
                          self.samples_per_epoch(source, split.train), epoch_order, epochs=True)

    def valid_part(self, source: Source, split_key: str, docs: np.ndarray) -> GPTSamples:
        def epoch_order(_: int) -> EpochOrder:
            return self._cached(self.valid_description(source, split_key), lambda: self.compute_valid(source, docs))

        return GPTSamples(f"{source.name}[valid]", source.dataset, self.seq_len,
                          self.samples_per_epoch(source, docs), epoch_order, epochs=False)
