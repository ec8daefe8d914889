"""Training data settings (the `data:` section)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from megakv.config.errors import ConfigError


@dataclass
class DataConfig:
    # Prefixes of `.bin/.idx` pairs written by megakv-prep / megakv-merge (or Megatron), without suffix.
    datasets: list[str] = field(default_factory=list)
    # Sampling weight of each dataset (any positive scale). None: proportional to each one's size.
    weights: list[float] | None = None
    # Extra held-out datasets, used whole for validation only (e.g. the `*_valid` pairs of megakv-data).
    valid_datasets: list[str] = field(default_factory=list)
    # Tokenizer directory; None: the `tokenizer/` saved beside the first dataset.
    tokenizer: str | None = None
    # Fraction of each training dataset's sequences held out for validation, whole (megakv-prep writes one
    # sequence per document; a Megatron pair made with --split-sentences, one per sentence).
    valid_fraction: float = 0.01
    # Seed of the train/validation split; kept apart from `seed` so runs with different seeds share it.
    split_seed: int = 1234
    # Seed of the sample order (documents and samples are reshuffled every epoch from it).
    seed: int = 1234
    # Where sample orders are cached; None: `index-cache/` beside the first dataset. Must be on a
    # filesystem every rank sees (one rank builds the cache, the others read it).
    cache_dir: str | None = None
    # Document boundaries inside packed samples (Megatron's --reset-attention-mask / --reset-position-ids):
    # a token attends only to its own document; positions restart at 0 after every end-of-document token.
    reset_attention_mask: bool = False
    reset_position_ids: bool = False
    # Tokens per training sample (Megatron's --seq-length); null: the model's context, model.max_seq_len
    # (--max-position-embeddings). Fine-tune an 8K-context model on 256-token windows: its exports keep 8K.
    seq_len: int | None = None

    @property
    def index_cache_dir(self) -> str:
        """cache_dir, else `index-cache/` beside the first dataset."""
        return self.cache_dir or os.path.join(os.path.dirname(self.datasets[0]), "index-cache")

    def validate(self, prefix: str = "data") -> None:
        def fail(name: str, problem: str, fix: str) -> None:
            raise ConfigError(f"{prefix}.{name}", getattr(self, name), problem, fix)

        if not self.datasets:
            fail("datasets", "no training datasets", "list the prefixes written by megakv-prep, e.g. "
                 "data.datasets=[data/shakespeare/shakespeare_train]")
        for name in ("datasets", "valid_datasets"):
            for p in getattr(self, name):
                if not p or p.endswith((".bin", ".idx")):
                    fail(name, f"entry {p!r} is not a dataset prefix", "give the path without .bin / .idx")
        for name in ("datasets", "valid_datasets"):
            spelled = [os.path.normpath(os.path.abspath(p)) for p in getattr(self, name)]
            twice = sorted({p for p in getattr(self, name) if spelled.count(os.path.normpath(os.path.abspath(p))) > 1})
            if twice:  # both copies shuffle alike: every sample would come twice in a row
                fail(name, f"lists {twice[0]} more than once", "list each dataset once; give it a larger share "
                     "with data.weights instead")
        if self.weights is not None:
            if len(self.weights) != len(self.datasets):
                fail("weights", f"{len(self.weights)} weights for {len(self.datasets)} datasets",
                     "give one weight per dataset, or null for weights proportional to size")
            if any(not w > 0 for w in self.weights):
                fail("weights", "weights must be positive", "drop a dataset instead of giving it weight 0")
        if not 0.0 <= self.valid_fraction < 1.0:
            fail("valid_fraction", "must be in [0, 1)", "e.g. 0.01; 0 holds nothing out")
        if self.seq_len is not None and self.seq_len < 1:
            fail("seq_len", "must be positive", "e.g. 256, or null for the model's max_seq_len")
        for name in ("seed", "split_seed"):
            if not 0 <= getattr(self, name) < 2**32:
                fail(name, "must be in [0, 2**32)", "pick a smaller non-negative integer")
