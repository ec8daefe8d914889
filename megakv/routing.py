"""Routing plans: which layer's K/V each layer attends with. The single place where plans are made.

A plan is one source index per layer with src[l] <= l and src[0] == 0. Layer l attends with its own
queries to the K/V of layer src[l].

Training strategies (sampled per step, see `sample_plan`):
  rcla      each layer l >= 1 is routed with probability q_cross to a layer drawn uniformly from the
            earlier layers (optionally only the `max_distance` nearest ones); otherwise its own K/V.
  none      every layer uses its own K/V.
  cla:K     fixed groups of K layers; every layer reads its group leader (first layer of the group).
  rdcla:K   fixed groups; each non-leader uses its leader's K/V with probability q_cross, else its own.

Deployment plans (see `deployment_plan`): a retained set S (`every:K` keeps 0, K, 2K, ...; or an
explicit list); layer l reads mu(l) = the nearest retained layer at or below l.

Sampling is a pure function of (seed, step, micro_batch) through its own numpy generator, never a
global RNG, so every rank and every resumed run computes the same plan.

q_cross is P(cross-layer). The paper's p is ambiguous: its Sec. 3.2 defines p as the probability of a layer's
own K/V, while Sec. 4.1 and Table 1 use p as the probability of routing ("< 2% even at p = 0.75"); megakv
names the quantity it means.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class RoutingPlan:
    sources: tuple[int, ...]

    def __post_init__(self) -> None:
        validate_sources(self.sources)

    @property
    def n_layers(self) -> int:
        return len(self.sources)

    def __getitem__(self, layer: int) -> int:
        return self.sources[layer]

    def __len__(self) -> int:
        return len(self.sources)

    def __str__(self) -> str:
        return " ".join(str(s) for s in self.sources)

    @cached_property
    def kv_needed(self) -> tuple[bool, ...]:
        """kv_needed[l]: some layer (l itself or a later one) attends with layer l's K/V."""
        needed = [False] * self.n_layers
        for src in self.sources:
            needed[src] = True
        return tuple(needed)

    @cached_property
    def last_reader(self) -> tuple[int, ...]:
        """last_reader[l]: the last layer that reads layer l's K/V (-1 if none)."""
        last = [-1] * self.n_layers
        for layer, src in enumerate(self.sources):
            last[src] = layer
        return tuple(last)

    @property
    def retained(self) -> tuple[int, ...]:
        """Layers whose K/V is used (what a deployment cache would hold)."""
        return tuple(i for i, needed in enumerate(self.kv_needed) if needed)

    @property
    def retained_fraction(self) -> float:
        return len(self.retained) / self.n_layers

    @property
    def routed_fraction(self) -> float:
        """Fraction of layers that attend with another layer's K/V."""
        return sum(s != i for i, s in enumerate(self.sources)) / self.n_layers

    def distances(self) -> list[int]:
        return [i - s for i, s in enumerate(self.sources)]

    @classmethod
    def own(cls, n_layers: int) -> RoutingPlan:
        return cls(tuple(range(n_layers)))


def crossing(plan: RoutingPlan, boundary: int) -> tuple[int, ...]:
    """Layers j < boundary whose K/V a layer at or after `boundary` reads, ascending.

    What must cross a pipeline-stage boundary before layer `boundary` besides the hidden state (and what
    `run_block`'s K/V bank holds on entry to that layer).
    """
    if not 0 <= boundary <= plan.n_layers:
        raise ValueError(f"boundary {boundary} is outside [0, {plan.n_layers}]")
    return tuple(j for j in range(boundary) if plan.last_reader[j] >= boundary)


def validate_sources(sources: Sequence[int]) -> None:
    if len(sources) == 0:
        raise ValueError("a routing plan needs at least one layer")
    if sources[0] != 0:
        raise ValueError(f"layer 0 must use its own K/V (src[0] == 0), got src[0] = {sources[0]}")
    for layer, src in enumerate(sources):
        if not isinstance(src, (int, np.integer)) or not 0 <= src <= layer:
            raise ValueError(
                f"layer {layer} has source {src!r}: a source must be an earlier layer or the layer "
                f"itself (0 <= src[l] <= l)")


# ----------------------------------------------------------------------------- training strategies


@dataclass(frozen=True)
class Strategy:
    kind: str  # rcla | none | cla | rdcla
    group: int = 1


def parse_strategy(spec: str, n_layers: int) -> Strategy:
    spec = spec.strip().lower()
    if spec in ("rcla", "none"):
        return Strategy(spec)
    kind, sep, arg = spec.partition(":")
    if kind in ("cla", "rdcla") and sep:
        try:
            group = int(arg)
        except ValueError:
            raise ValueError(f"group size in {spec!r} is not an integer") from None
        if not 1 <= group <= n_layers:
            raise ValueError(f"group size {group} must lie in [1, n_layers={n_layers}]")
        return Strategy(kind, group)
    raise ValueError(f"unknown routing strategy {spec!r} (expected rcla, none, cla:K or rdcla:K)")


def plan_rng(seed: int, step: int, micro_batch: int = 0) -> np.random.Generator:
    """The generator for one plan: a pure function of (seed, step, micro_batch)."""
    if min(seed, step, micro_batch) < 0:
        raise ValueError(f"seed, step and micro_batch must be >= 0, got {(seed, step, micro_batch)}")
    return np.random.default_rng(np.random.SeedSequence([seed, step, micro_batch]))


def sample_plan(strategy: str, n_layers: int, *, q_cross: float, seed: int, step: int,
                micro_batch: int = 0, max_distance: int | None = None) -> RoutingPlan:
    parsed = parse_strategy(strategy, n_layers)
    if not 0.0 <= q_cross <= 1.0:
        raise ValueError(f"q_cross must lie in [0, 1], got {q_cross}")
    rng = plan_rng(seed, step, micro_batch)
    sources = list(range(n_layers))
    if parsed.kind == "rcla":
        for layer in range(1, n_layers):
            if rng.random() < q_cross:
                lowest = 0 if max_distance is None else max(0, layer - max_distance)
                sources[layer] = int(rng.integers(lowest, layer))
    elif parsed.kind == "cla":
        sources = [(layer // parsed.group) * parsed.group for layer in range(n_layers)]
    elif parsed.kind == "rdcla":
        for layer in range(n_layers):
            leader = (layer // parsed.group) * parsed.group
            if layer != leader and rng.random() < q_cross:
                sources[layer] = leader
    return RoutingPlan(tuple(sources))


# ----------------------------------------------------------------------------- deployment plans


def plan_from_retained(retained: Iterable[int], n_layers: int) -> RoutingPlan:
    """mu(l) = max{j in S : j <= l}. S must contain layer 0 and only valid layer indices."""
    kept = sorted(set(int(x) for x in retained))
    if not kept:
        raise ValueError("the retained set is empty: keep at least layer 0")
    bad = [x for x in kept if not 0 <= x < n_layers]
    if bad:
        raise ValueError(f"retained layers {bad} are out of range for a {n_layers}-layer model "
                         f"(valid: 0..{n_layers - 1})")
    if kept[0] != 0:
        raise ValueError(f"the retained set {kept} must include layer 0: layer 0 has no earlier layer "
                         f"to read from")
    sources, current = [], 0
    kept_set = set(kept)
    for layer in range(n_layers):
        if layer in kept_set:
            current = layer
        sources.append(current)
    return RoutingPlan(tuple(sources))


def deployment_plan(spec: str | Sequence[int], n_layers: int) -> RoutingPlan:
    """`every:K`, `all`, an explicit list like `0,3,5` / `[0, 3, 5]`, or a sequence of ints."""
    if not isinstance(spec, str):
        return plan_from_retained(spec, n_layers)
    text = spec.strip().lower()
    if text in ("all", "full", "every:1"):
        return RoutingPlan.own(n_layers)
    if text.startswith("every:"):
        try:
            k = int(text.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"bad retention spec {spec!r}: expected every:K with an integer K") from None
        if k < 1:
            raise ValueError(f"bad retention spec {spec!r}: K must be >= 1")
        return plan_from_retained(range(0, n_layers, k), n_layers)
    try:
        layers = [int(t) for t in text.strip("[]").replace(",", " ").split()]
    except ValueError:
        raise ValueError(
            f"bad retention spec {spec!r}: expected every:K, all, or a list of layer indices like 0,2,4"
        ) from None
    return plan_from_retained(layers, n_layers)
