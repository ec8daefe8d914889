"""Choose which layers keep a KV cache under a memory budget, from measured validation loss.

Search (every candidate is scored on the same held-out windows):
  1. every-k patterns that fit the budget (k = 1..L, |every:k| = ceil(L / k));
  2. greedy growth from the best of them: add the single layer that lowers the loss most, while the
     budget allows and the loss improves;
  3. local search: swap one retained layer (never layer 0) for a non-retained one, best move first,
     until no swap improves or the evaluation allowance is spent.
The every-k patterns are always scored; `max_evaluations` bounds the sets scored after them.
Only strict improvements are accepted, so the result is never worse than the best every-k pattern on
the data it was scored on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from megakv.config.model import ModelConfig
from megakv.inference.cache import kv_bytes_per_token

Retained = tuple[int, ...]


@dataclass(frozen=True)
class CacheBudget:
    max_layers: int  # at most this many layers keep a cache
    description: str


def budget_from_fraction(fraction: float, n_layers: int) -> CacheBudget:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"a cache budget fraction must lie in (0, 1], got {fraction}")
    max_layers = math.floor(fraction * n_layers + 1e-9)
    if max_layers < 1:
        raise ValueError(f"a budget of {fraction:.3g} of the cache is below one layer of {n_layers} "
                         f"(needs at least {1 / n_layers:.3g}): layer 0 must always keep its cache")
    return CacheBudget(max_layers, f"{fraction:.3g} of a full cache ({max_layers} of {n_layers} layers)")


def budget_from_bytes(bytes_per_token: int, cfg: ModelConfig, cache_dtype: torch.dtype) -> CacheBudget:
    per_layer = kv_bytes_per_token(cfg, 1, cache_dtype)
    max_layers = min(bytes_per_token // per_layer, cfg.n_layers)
    if max_layers < 1:
        raise ValueError(f"a budget of {bytes_per_token} bytes per token is below one layer's cache "
                         f"({per_layer} bytes per token at {str(cache_dtype).removeprefix('torch.')}): "
                         f"raise it to at least {per_layer}")
    return CacheBudget(int(max_layers), f"{bytes_per_token} B/token ({max_layers} of {cfg.n_layers} layers "
                                         f"at {per_layer} B/token each)")


def parse_budget(text: str, cfg: ModelConfig, cache_dtype: torch.dtype) -> CacheBudget:
    """`0.5` or `50%` (fraction of a full cache), or `4096B` (bytes per token)."""
    spec = text.strip().lower()
    try:
        if spec.endswith("%"):
            return budget_from_fraction(float(spec[:-1]) / 100, cfg.n_layers)
        if spec.endswith("b"):
            return budget_from_bytes(int(spec[:-1]), cfg, cache_dtype)
        return budget_from_fraction(float(spec), cfg.n_layers)
    except ValueError as e:
        if "budget" in str(e):
            raise
        raise ValueError(f"bad budget {text!r}: use a fraction (0.5), a percentage (50%) or bytes per "
                         f"token (4096B)") from None


def every_k(n_layers: int, k: int) -> Retained:
    return tuple(range(0, n_layers, k))


def retain_spec(retained: Retained) -> str:
    """The string megakv-generate / megakv-eval / from_pretrained(retain=...) accept."""
    return ",".join(str(layer) for layer in retained)


@dataclass(frozen=True)
class Candidate:
    retained: Retained
    loss: float
    found_by: str  # every:K | greedy-add | swap


@dataclass
class PlanSearchResult:
    budget: CacheBudget
    best: Candidate
    best_every_k: Candidate
    every_k: list[Candidate]
    evaluations: int
    history: list[Candidate] = field(default_factory=list)  # accepted improvements after every-k, in order

    @property
    def improvement(self) -> float:
        return self.best_every_k.loss - self.best.loss


def search_retained_sets(n_layers: int, budget: CacheBudget, loss_of: Callable[[Retained], float],
                         max_evaluations: int = 200) -> PlanSearchResult:
    """Best retained set within `budget` according to `loss_of` (lower is better); see the module docstring."""
    if max_evaluations < 1:
        raise ValueError(f"max_evaluations must be >= 1, got {max_evaluations}")
    scores: dict[Retained, float] = {}

    def score(retained: Retained) -> float:
        if retained not in scores:
            scores[retained] = loss_of(retained)
        return scores[retained]

    # every:k for k = 1..L; several k can give the same set (e.g. {0} for every k >= L): keep the smallest k.
    patterns: dict[Retained, str] = {}
    for k in range(1, n_layers + 1):
        if len(every_k(n_layers, k)) <= budget.max_layers:
            patterns.setdefault(every_k(n_layers, k), f"every:{k}")
    every = [Candidate(retained, score(retained), name) for retained, name in patterns.items()]
    best_every = min(every, key=lambda c: c.loss)
    best, history = best_every, []

    def budget_left() -> bool:
        return len(scores) < len(patterns) + max_evaluations

    def consider(neighbours: Sequence[Retained], how: str) -> Candidate | None:
        found = None
        for retained in neighbours:
            if not budget_left() and retained not in scores:
                break
            loss = score(retained)
            if loss < best.loss and (found is None or loss < found.loss):
                found = Candidate(retained, loss, how)
        return found

    while len(best.retained) < budget.max_layers and budget_left():
        kept = set(best.retained)
        grown = consider([tuple(sorted(kept | {a})) for a in range(n_layers) if a not in kept], "greedy-add")
        if grown is None:
            break
        best = grown
        history.append(best)

    while budget_left():
        kept = set(best.retained)
        swaps = [tuple(sorted((kept - {r}) | {a})) for r in best.retained if r != 0
                 for a in range(1, n_layers) if a not in kept]
        moved = consider(swaps, "swap")
        if moved is None:
            break
        best = moved
        history.append(best)

    return PlanSearchResult(budget, best, best_every, every, len(scores), history)


def most_evaluations(n_layers: int, budget: CacheBudget, max_evaluations: int) -> int:
    """An upper bound on the sets search_retained_sets scores (for a progress bar's ETA)."""
    patterns = len({every_k(n_layers, k) for k in range(1, n_layers + 1)
                    if len(every_k(n_layers, k)) <= budget.max_layers})
    # every set holds layer 0 and at most max_layers layers in all
    possible = sum(math.comb(n_layers - 1, size - 1) for size in range(1, budget.max_layers + 1))
    return min(possible, patterns + max_evaluations)


def plan_with_model(model, windows: torch.Tensor, budget: CacheBudget, batch_size: int = 8,
                    max_evaluations: int = 200, progress: Callable[[int], None] | None = None) -> PlanSearchResult:
    """search_retained_sets scored by the model's mean loss on `windows` (see megakv/eval/loss.py);
    `progress(n)` is told after each batch how many windows it scored."""
    from megakv.eval.loss import mean_loss
    from megakv.routing import plan_from_retained

    n_layers = model.cfg.n_layers

    def loss_of(retained: Retained) -> float:
        return mean_loss(model, plan_from_retained(retained, n_layers), windows, batch_size, progress)[0]

    return search_retained_sets(n_layers, budget, loss_of, max_evaluations)
