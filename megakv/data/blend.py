"""Mixing several sample sets: a fixed, evenly spread interleave repeated block after block.

A block of C global samples holds exactly counts[d] samples of part d (counts from the weights by largest
remainder). Inside a block, part d's j-th sample sits at "time" (j + 0.5) / counts[d] and the block is
the parts' samples sorted by time, so every stretch of the stream has the weighted mix, not just the
whole. Global index g -> block g // C, slot g % C -> (part d, the part's index b * counts[d] + rank).
Random access is O(1) and needs no total length, so a train stream can run any number of steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megakv.data.errors import DataError

RESOLUTION = 1 << 16  # block size for weights: each part's share is exact to 1 / 65536


def counts_from_weights(weights: Sequence[float], resolution: int = RESOLUTION,
                        names: Sequence[str] | None = None, from_sizes: bool = False) -> list[int]:
    """Samples of each part per block. `names` name the parts in errors; `from_sizes`: the weights are the
    parts' sample counts (data.weights null), not weights the user gave."""
    total = float(sum(weights))
    exact = [w / total * resolution for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: resolution - sum(counts)]:
        counts[i] += 1
    for i, c in enumerate(counts):
        if c == 0:
            name = names[i] if names is not None else f"dataset {i}"
            if from_sizes:
                raise DataError(f"{name} holds {weights[i]:g} samples, below 1/{resolution} of all {total:g}: with "
                                "data.weights null each dataset weighs its size, and this one gets no place in the "
                                "blend", "give data.weights explicitly (it may weigh more than its size), or drop it")
            raise DataError(f"blend weight {weights[i]} of {name} is below 1/{resolution} of the total",
                            "raise that weight or drop the dataset")
    return counts


class BlendedSamples:
    """Interleaves `parts` with exactly `counts[d]` samples of part d in every block of sum(counts).

    With `repeat=False` (validation) the stream is one block: counts must equal the parts' lengths.
    """

    def __init__(self, parts: Sequence, counts: Sequence[int], *, repeat: bool):
        if len(parts) != len(counts) or not parts:
            raise ValueError("one count per part is needed")
        self.parts, self.counts, self.repeat = list(parts), [int(c) for c in counts], repeat
        self.block = sum(self.counts)
        times = np.concatenate([(np.arange(c) + 0.5) / c for c in self.counts])
        part = np.concatenate([np.full(c, d, np.int64) for d, c in enumerate(self.counts)])
        rank = np.concatenate([np.arange(c, dtype=np.int64) for c in self.counts])
        by_time = np.lexsort((part, times))
        self._slot_part, self._slot_rank = part[by_time], rank[by_time]
        self.seq_len = parts[0].seq_len

    def __len__(self) -> int:
        """Samples in one pass over every part (for a train stream, indices past it are valid too)."""
        return sum(len(p) for p in self.parts) if self.repeat else self.block

    def locate(self, g: int) -> tuple[int, int]:
        """(part, index within the part) of global sample g."""
        if g < 0 or (not self.repeat and g >= self.block):
            raise IndexError(f"sample {g} out of range ({self.block} samples)")
        b, slot = divmod(int(g), self.block)
        d = int(self._slot_part[slot])
        return d, b * self.counts[d] + int(self._slot_rank[slot])

    def __getitem__(self, g: int) -> np.ndarray:
        d, k = self.locate(g)
        return self.parts[d][k]
