"""routing.q_cross_warmup_steps: q_cross ramps linearly from 0 to its value, the same on every rank and resume."""

from __future__ import annotations

import pytest
from train_data import prepare_tiny_dataset
from train_helpers import launch_train, parse_plan, plan_traces, read_status

from megakv.config import ConfigError, RoutingConfig, load_config
from megakv.routing import RoutingPlan
from megakv.train.plans import sample_step_plans

LAYERS = 8


def _routed_fraction(cfg: RoutingConfig, step: int, slots: int = 400) -> float:
    plans = sample_step_plans(cfg, LAYERS, step, slots)
    return sum(s != layer for p in plans for layer, s in enumerate(p.sources)) / (slots * (LAYERS - 1))


def test_q_cross_ramps_from_zero_to_its_value_then_stays():
    cfg = RoutingConfig(strategy="rcla", q_cross=0.6, q_cross_warmup_steps=10)
    assert [cfg.q_cross_at(s) for s in (0, 5, 9, 10, 11, 500)] == pytest.approx([0.0, 0.3, 0.54, 0.6, 0.6, 0.6])
    assert RoutingConfig(q_cross=0.6).q_cross_at(0) == 0.6  # no ramp: the paper's constant q_cross


def test_plans_follow_the_ramp_and_match_the_unramped_plans_after_it():
    ramped = RoutingConfig(strategy="rcla", q_cross=0.6, q_cross_warmup_steps=10, seed=3)
    flat = RoutingConfig(strategy="rcla", q_cross=0.6, seed=3)
    assert all(p == RoutingPlan.own(LAYERS) for p in sample_step_plans(ramped, LAYERS, 0, 50))
    assert _routed_fraction(ramped, 5) == pytest.approx(0.3, abs=0.04)
    assert _routed_fraction(flat, 5) == pytest.approx(0.6, abs=0.04)
    for step in (10, 11, 40):
        assert sample_step_plans(ramped, LAYERS, step, 4) == sample_step_plans(flat, LAYERS, step, 4)


def test_a_negative_warmup_is_refused_with_the_field_named():
    with pytest.raises(ConfigError, match="'routing.q_cross_warmup_steps'.*must be >= 0"):
        load_config(None, ["routing.q_cross_warmup_steps=-1"])


def test_training_uses_the_ramped_plans_on_every_rank(tmp_path):
    dataset = prepare_tiny_dataset(tmp_path / "data")
    run_dir = tmp_path / "run"
    overrides = [f"data.datasets=[{dataset}]", f"train.run_dir={run_dir}", "train.steps=6",
                 "train.debug.check_plans=true", "routing.q_cross=1.0", "routing.q_cross_warmup_steps=4",
                 "validation.every=0", "checkpoint.every=0"]
    run = launch_train(overrides, nproc=2)
    assert run.ok, run.output[-4000:]
    assert read_status(run_dir)["state"] == "finished"
    traces = plan_traces(run_dir)
    assert sorted(traces) == [0, 1] and traces[0] == traces[1]
    cfg = RoutingConfig(strategy="rcla", q_cross=1.0, q_cross_warmup_steps=4, seed=1234)  # tiny.yaml's seed
    n_layers = 4  # tiny.yaml
    expected = [f"{step + 1} " + " | ".join(str(p) for p in sample_step_plans(cfg, n_layers, step, 1))
                for step in range(6)]
    assert traces[0] == expected
    assert traces[0][0] == "1 " + str(RoutingPlan.own(n_layers))  # step 1: q 0, every layer its own K/V
    last = parse_plan(traces[0][-1].split(" ", 1)[1])
    assert all(s != layer for layer, s in enumerate(last.sources) if layer > 0)  # q 1.0 after the ramp
