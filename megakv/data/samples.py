"""Train/validation split by documents, and fixed-length GPT samples in a seeded per-epoch order.

A split's documents are read in an order (shuffled anew each train epoch), concatenated (each already
ends with its end-of-document token), and cut into samples of seq_len + 1 tokens that overlap by one
token (inputs = sample[:-1], labels = sample[1:]); the tail that does not fill a sample is dropped for
that epoch. Record-aligned data (QA records prepared as seq_len-token samples with a loss mask) has one
sample per record: the last record's missing final label is MASKED_FILLER, a label the loss ignores.
The samples of an epoch are then served in a shuffled order. Everything is a pure function of
(data, seed, seq_len, split, epoch), drawn from numpy's legacy RandomState, whose streams never change
across numpy versions, so an order built today is the order rebuilt after a resume next year.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from megakv.data.errors import DataError
from megakv.data.indexed import IndexedDataset

_SPLIT, _DOCS, _SAMPLES, _VALID = 0, 1, 2, 3  # stream tags: one independent random stream per purpose
MASKED_FILLER = -1  # token id 0 with its loss mask off (sft.MaskedTokens' encoding): never counted


def _rng(*words: int) -> np.random.RandomState:
    return np.random.RandomState([w % (1 << 32) for w in words])


def salt_of(identity: str) -> int:
    """32 bits of a dataset's identity: different datasets get different random streams."""
    return int(identity[:8], 16)


def split_documents(num_documents: int, valid_fraction: float, split_seed: int, salt: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) document ids, each sorted: a seeded random `valid_fraction` of the documents.

    At least one document is held out when valid_fraction > 0 and there are two or more documents.
    """
    if valid_fraction <= 0 or num_documents < 2:
        return np.arange(num_documents, dtype=np.int64), np.empty(0, np.int64)
    n_valid = min(num_documents - 1, max(1, round(valid_fraction * num_documents)))
    chosen = _rng(split_seed, salt, _SPLIT).permutation(num_documents)[:n_valid]
    mask = np.zeros(num_documents, bool)
    mask[chosen] = True
    return np.flatnonzero(~mask).astype(np.int64), np.flatnonzero(mask).astype(np.int64)


@dataclass(frozen=True)
class EpochOrder:
    docs: np.ndarray  # document ids in reading order
    starts: np.ndarray  # token offset of each document in the concatenation; len(docs) + 1 entries
    order: np.ndarray  # sample ids of the epoch, in the order they are served

    def arrays(self) -> dict[str, np.ndarray]:
        return {"docs": self.docs, "starts": self.starts, "order": self.order}


def samples_in(total_tokens: int, seq_len: int, record_aligned: bool = False) -> int:
    # A sample needs seq_len + 1 tokens; record-aligned data pads the very last label (MASKED_FILLER).
    return max(0, (total_tokens - (0 if record_aligned else 1)) // seq_len)


def build_epoch_order(lengths: np.ndarray, docs: np.ndarray, seq_len: int, doc_rng: np.random.RandomState | None,
                      sample_rng: np.random.RandomState, record_aligned: bool = False) -> EpochOrder:
    docs = docs if doc_rng is None else docs[doc_rng.permutation(len(docs))]
    starts = np.zeros(len(docs) + 1, np.int64)
    np.cumsum(lengths[docs], dtype=np.int64, out=starts[1:])
    order = sample_rng.permutation(samples_in(int(starts[-1]), seq_len, record_aligned)).astype(np.int64)
    return EpochOrder(docs.astype(np.int64), starts, order)


def train_epoch_order(lengths: np.ndarray, docs: np.ndarray, seq_len: int, seed: int, salt: int, epoch: int,
                      record_aligned: bool = False) -> EpochOrder:
    return build_epoch_order(lengths, docs, seq_len, _rng(seed, salt, epoch, _DOCS),
                             _rng(seed, salt, epoch, _SAMPLES), record_aligned)


def valid_order(lengths: np.ndarray, docs: np.ndarray, seq_len: int, split_seed: int, salt: int,
                record_aligned: bool = False) -> EpochOrder:
    # Documents in file order, samples in a fixed shuffled order (independent of the training seed), so
    # evaluating only the first few batches still sees a spread of the held-out data.
    return build_epoch_order(lengths, docs, seq_len, None, _rng(split_seed, salt, 0, _VALID), record_aligned)


class GPTSamples:
    """Fixed-length samples over one split of one dataset.

    `len()` is the number of samples in one epoch. Train sets (`epochs=True`) accept any index >= 0:
    index i is sample i % len of epoch i // len, each epoch in its own order. Validation sets are one
    fixed epoch. `ds[i]` is an int64 array of seq_len + 1 tokens.
    """

    # Set by the loader: a token id at or above it is refused when its sample is read (a max per piece,
    # cheap), naming the file and the document, instead of an IndexError deep in the embedding.
    vocab_size: int | None = None

    def __init__(self, name: str, dataset: IndexedDataset, seq_len: int, num_samples: int,
                 epoch_order: Callable[[int], EpochOrder], *, epochs: bool):
        self.name, self.dataset, self.seq_len = name, dataset, seq_len
        self._num_samples = num_samples
        self._epoch_order = epoch_order
        self._epochs = epochs
        self._recent: dict[int, EpochOrder] = {}  # a couple of epochs kept open (per instance)

    def __len__(self) -> int:
        return self._num_samples

    def epoch(self, e: int) -> EpochOrder:
        order = self._recent.get(e)
        if order is None:
            order = self._epoch_order(e)
            if len(order.order) != self._num_samples:
                raise DataError(f"{self.name}: epoch {e} has {len(order.order)} samples, expected "
                                f"{self._num_samples}; the index cache does not match the data",
                                "delete the index cache directory and restart")
            if len(self._recent) >= 2:
                self._recent.pop(next(iter(self._recent)))
            self._recent[e] = order
        return order

    def locate(self, i: int) -> tuple[int, int]:
        """(epoch, sample id within the epoch's concatenation) of index i."""
        if i < 0 or (not self._epochs and i >= self._num_samples):
            raise IndexError(f"sample {i} out of range for {self.name} ({self._num_samples} samples)")
        e, position = divmod(i, self._num_samples)
        return e, int(self.epoch(e).order[position])

    def __getitem__(self, i: int) -> np.ndarray:
        e, sample = self.locate(int(i))
        order = self.epoch(e)
        count = self.seq_len + 1
        start = sample * self.seq_len
        out = np.empty(count, np.int64)
        k = int(np.searchsorted(order.starts, start, side="right")) - 1
        offset, filled = start - int(order.starts[k]), 0
        while filled < count:
            if k == len(order.docs):  # only record-aligned data reads past its end (samples_in)
                out[filled:] = MASKED_FILLER
                break
            doc = int(order.docs[k])
            piece = self.dataset.get(doc, offset, count - filled)
            if self.vocab_size is not None and len(piece) and int(piece.max()) >= self.vocab_size:
                raise DataError(f"{self.dataset.prefix}.bin: document {doc} holds token id {int(piece.max())}, "
                                f"outside the vocabulary of {self.vocab_size} (its .meta.json says otherwise, or "
                                "the .bin was changed after preparation)",
                                "re-prepare the dataset with megakv-prep, or point data.tokenizer at the tokenizer "
                                "it was prepared with")
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            k, offset = k + 1, 0
        return out
