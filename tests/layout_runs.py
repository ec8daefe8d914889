"""Shared by the parallel-layout launch tests: one tiny config that every layout trains identically, and the
check that a run equals the one-process reference step by step (loss, clipped-with grad norm, validation at
every retention, exported weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import launch_train, read_metrics, step_losses, validation_records

from megakv.train.export import consolidated_state_dict

STEPS = 4


def overrides(dataset: Path, run_dir: Path, *extra: str) -> list[str]:
    # tiny: 4 layers, 4 heads, 2 K/V heads, global batch 8 of micro-batches of 2; one plan per micro-batch
    return [f"data.datasets=[{dataset}]", f"train.run_dir={run_dir}", "parallel.zero_stage=1", f"train.steps={STEPS}",
            "routing.per_micro_batch=true", "routing.q_cross=0.75", "optim.grad_clip=0.5", "validation.every=2",
            "train.debug.check_plans=true", *extra]


def train(dataset: Path, run_dir: Path, nproc: int, *extra: str, resume: bool = False) -> Path:
    run = launch_train(overrides(dataset, run_dir, *extra), nproc=nproc, resume=resume)
    assert run.ok, f"{run_dir.name} failed with {run.returncodes}:\n{run.output[-6000:]}"
    return run_dir


def grad_norms(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/grad_norm"] for r in read_metrics(run_dir) if "loss_exact" in r}


def assert_same_training(run: Path, reference: Path, weights_atol: float = 1e-6) -> None:
    ours, theirs = step_losses(run), step_losses(reference)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    for step in theirs:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-6), (step, ours, theirs)
    for step, norm in grad_norms(reference).items():
        assert grad_norms(run)[step] == pytest.approx(norm, rel=1e-5), step
    valid_ours, valid_theirs = validation_records(run), validation_records(reference)
    assert [r["step"] for r in valid_ours] == [r["step"] for r in valid_theirs] == [2, 4]
    for a, b in zip(valid_ours, valid_theirs):
        for key in ("valid/loss_every1", "valid/loss_every2", "valid/loss_every3", "valid/loss_every4"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
    _, mine, _ = consolidated_state_dict(run)
    _, dense, _ = consolidated_state_dict(reference)
    assert mine.keys() == dense.keys()
    for name in dense:
        assert mine[name].shape == dense[name].shape and mine[name].dtype == torch.float32, name
        assert torch.allclose(mine[name], dense[name], rtol=0, atol=weights_atol), name
