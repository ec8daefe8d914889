"""Routing plans: the rcla sampler's statistics and determinism, baselines, and deployment plans."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from megakv.routing import RoutingPlan, deployment_plan, plan_from_retained, sample_plan

L = 8


def chi_square_critical(dof: int, z: float = 3.09) -> float:
    """Upper 0.1% point of chi-square (Wilson-Hilferty approximation)."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def rcla_plans(n: int, q: float, max_distance=None, seed=7):
    return [sample_plan("rcla", L, q_cross=q, seed=seed, step=s, max_distance=max_distance) for s in range(n)]


@pytest.mark.parametrize("q", [0.25, 0.5, 0.75])
def test_rcla_routing_frequency_matches_q_cross(q):
    plans = rcla_plans(4000, q)
    routed = np.array([[p[i] != i for i in range(1, L)] for p in plans])
    assert all(p[0] == 0 for p in plans)
    n = routed.size
    # Binomial: observed rate within 4 standard deviations of q.
    assert abs(routed.mean() - q) < 4 * math.sqrt(q * (1 - q) / n)
    # Every layer is routed at the same rate (one independent draw per layer).
    per_layer = routed.mean(axis=0)
    assert np.all(np.abs(per_layer - q) < 4 * math.sqrt(q * (1 - q) / len(plans)))


def test_rcla_sources_are_uniform_over_earlier_layers():
    plans = rcla_plans(6000, 0.6)
    for layer in range(2, L):
        counts = Counter(p[layer] for p in plans if p[layer] != layer)
        assert set(counts) <= set(range(layer))
        total = sum(counts.values())
        expected = total / layer
        chi2 = sum((counts.get(j, 0) - expected) ** 2 / expected for j in range(layer))
        assert chi2 < chi_square_critical(layer - 1), (layer, counts)


def test_rcla_max_distance_limits_sources_uniformly():
    plans = rcla_plans(6000, 1.0, max_distance=2)
    for layer in range(1, L):
        sources = Counter(p[layer] for p in plans)
        allowed = set(range(max(0, layer - 2), layer))
        assert set(sources) == allowed
        if len(allowed) == 2:
            a, b = (sources[j] for j in sorted(allowed))
            assert abs(a - b) < 4 * math.sqrt(len(plans) / 4) * 2


def test_sampling_is_a_pure_function_of_seed_step_micro_batch():
    a = sample_plan("rcla", L, q_cross=0.5, seed=3, step=11, micro_batch=2)
    torch.manual_seed(0)
    np.random.seed(0)
    torch.rand(100)
    b = sample_plan("rcla", L, q_cross=0.5, seed=3, step=11, micro_batch=2)
    torch.manual_seed(12345)
    np.random.seed(999)
    c = sample_plan("rcla", L, q_cross=0.5, seed=3, step=11, micro_batch=2)
    assert a == b == c
    # The global RNG state is left untouched.
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    sample_plan("rcla", L, q_cross=0.5, seed=3, step=11)
    assert torch.equal(torch.rand(3), expected)
    # Different (seed, step, micro-batch) give different streams.
    many = {str(sample_plan("rcla", L, q_cross=0.5, seed=3, step=s, micro_batch=m))
            for s in range(20) for m in range(3)}
    assert len(many) > 40
    assert sample_plan("rcla", L, q_cross=0.5, seed=4, step=11, micro_batch=2) != a or \
        sample_plan("rcla", L, q_cross=0.5, seed=5, step=11, micro_batch=2) != a


def test_baseline_strategies():
    assert str(sample_plan("none", 6, q_cross=0.9, seed=0, step=0)) == "0 1 2 3 4 5"
    assert str(sample_plan("rcla", 6, q_cross=0.0, seed=0, step=0)) == "0 1 2 3 4 5"
    assert str(sample_plan("cla:2", 6, q_cross=0.0, seed=0, step=0)) == "0 0 2 2 4 4"
    assert str(sample_plan("cla:4", 6, q_cross=0.0, seed=0, step=0)) == "0 0 0 0 4 4"
    rd = [sample_plan("rdcla:3", 9, q_cross=0.6, seed=1, step=s) for s in range(2000)]
    for p in rd:
        for layer in range(9):
            leader = layer // 3 * 3
            assert p[layer] in (layer, leader)
    non_leaders = [p[i] != i for p in rd for i in range(9) if i % 3]
    assert abs(np.mean(non_leaders) - 0.6) < 0.03


@pytest.mark.parametrize("spec,expected", [
    ("every:1", "0 1 2 3 4 5 6"),
    ("all", "0 1 2 3 4 5 6"),
    ("every:2", "0 0 2 2 4 4 6"),
    ("every:3", "0 0 0 3 3 3 6"),
    ("every:4", "0 0 0 0 4 4 4"),
    ("every:7", "0 0 0 0 0 0 0"),
    ("0,3,5", "0 0 0 3 3 5 5"),
    ([0, 2], "0 0 2 2 2 2 2"),
    ("[0, 6]", "0 0 0 0 0 0 6"),
])
def test_deployment_plans_map_to_nearest_retained_layer_at_or_below(spec, expected):
    plan = deployment_plan(spec, 7)
    assert str(plan) == expected
    retained = set(plan.retained)
    for layer in range(7):
        assert plan[layer] == max(j for j in retained if j <= layer)
    assert plan.retained_fraction == len(retained) / 7


def test_retained_fraction_and_plan_printing():
    assert deployment_plan("every:2", 8).retained_fraction == 0.5
    assert deployment_plan("every:4", 8).retained_fraction == 0.25
    plan = RoutingPlan((0, 0, 2, 1, 4, 4))
    assert str(plan) == "0 0 2 1 4 4"
    assert plan.kv_needed == (True, True, True, False, True, False)
    assert plan.routed_fraction == 3 / 6
    assert plan.distances() == [0, 1, 0, 2, 0, 1]


@pytest.mark.parametrize("sources,message", [
    ((1, 1), "layer 0 must use its own"),
    ((0, 2, 2), "layer 1 has source 2"),
    ((0, -1), "layer 1 has source -1"),
    ((), "at least one layer"),
])
def test_invalid_plans_raise(sources, message):
    with pytest.raises(ValueError, match=message):
        RoutingPlan(sources)


@pytest.mark.parametrize("spec,message", [
    ("1,2", "must include layer 0"),
    ("0,9", r"out of range .* \(valid: 0\.\.5\)"),
    ("every:0", "K must be >= 1"),
    ("every:x", "expected every:K"),
    ("zero", "expected every:K, all, or a list"),
    ([], "empty"),
])
def test_invalid_retention_specs_raise(spec, message):
    with pytest.raises(ValueError, match=message):
        deployment_plan(spec, 6)


def test_invalid_strategies_raise():
    for bad, message in (("cla:0", "group size 0"), ("cla:x", "not an integer"), ("foo", "unknown routing")):
        with pytest.raises(ValueError, match=message):
            sample_plan(bad, 4, q_cross=0.5, seed=0, step=0)
    with pytest.raises(ValueError, match="q_cross"):
        sample_plan("rcla", 4, q_cross=1.5, seed=0, step=0)
    with pytest.raises(ValueError, match=">= 0"):
        sample_plan("rcla", 4, q_cross=0.5, seed=0, step=-1)
    assert plan_from_retained([0, 0, 1], 3) == RoutingPlan((0, 1, 1))  # duplicates are harmless
