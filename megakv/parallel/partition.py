"""Which transformer blocks each pipeline stage runs, decided before any process group starts.

Stage s runs blocks [cuts[s], cuts[s+1]); the embedding sits on the first stage, the final norm and
the head on the last. `uniform` gives every stage the same number of blocks (n_layers must divide);
`parameters` balances parameter counts, with the embedding counted on the first stage and the norm and
head on the last, so the end stages may get fewer blocks.
"""

from __future__ import annotations

import torch

from megakv.config.errors import ConfigError
from megakv.config.model import ModelConfig

PARTITION_METHODS = ("uniform", "parameters")


def block_parameters(cfg: ModelConfig) -> int:
    from megakv.model import Block

    with torch.device("meta"):  # counted, never allocated
        return sum(p.numel() for p in Block(cfg).parameters())


def stage_weights(cfg: ModelConfig) -> list[int]:
    """Parameters each block brings to its stage: the embedding on block 0, norm and head on the last."""
    weights = [block_parameters(cfg)] * cfg.n_layers
    table = cfg.vocab_size * cfg.d_model
    weights[0] += table
    weights[-1] += cfg.d_model + table  # a tied head still holds (and multiplies by) a copy of the table
    return weights


def balanced_cuts(weights: list[int], parts: int) -> list[int]:
    """Contiguous cut of `weights` into `parts` non-empty runs minimising the heaviest run (exact DP)."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    choice = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for p in range(1, parts + 1):
        for end in range(p, n + 1):
            for start in range(p - 1, end):
                cost = max(best[p - 1][start], prefix[end] - prefix[start])
                if cost < best[p][end]:
                    best[p][end], choice[p][end] = cost, start
    cuts, end = [n], n
    for p in range(parts, 0, -1):
        end = choice[p][end]
        cuts.append(end)
    return cuts[::-1]


def block_cuts(cfg: ModelConfig, pipeline: int, method: str, prefix: str = "parallel") -> list[int]:
    """[0, ..., n_layers]: stage s runs blocks [cuts[s], cuts[s+1]). Refuses a cut the user did not ask for."""
    n_layers = cfg.n_layers
    if method not in PARTITION_METHODS:
        raise ConfigError(f"{prefix}.pipeline_partition", method, f"expected one of {PARTITION_METHODS}",
                          "uniform: the same number of blocks per stage; parameters: balance parameter counts")
    if pipeline > n_layers:
        raise ConfigError(f"{prefix}.pipeline", pipeline,
                          f"more pipeline stages than transformer blocks (model.n_layers={n_layers})",
                          f"use parallel.pipeline <= {n_layers}")
    if method == "uniform":
        if n_layers % pipeline:
            raise ConfigError(f"{prefix}.pipeline", pipeline,
                              f"model.n_layers={n_layers} blocks do not divide into {pipeline} equal stages",
                              "choose a pipeline size that divides n_layers, or set "
                              "parallel.pipeline_partition=parameters to balance unequal stages")
        size = n_layers // pipeline
        return [s * size for s in range(pipeline + 1)]
    return balanced_cuts(stage_weights(cfg), pipeline)
