"""`megakv-convert to-universal`, then resume on another pipeline / data layout (real CLI, real processes).

A run interrupted at step 2 on the source layout is converted; a launch on the target layout loads the
universal checkpoint and (a) saves at once (train.steps=2): its fp32 weights and Adam moments equal the
source's bit for bit, (b) trains on: the next losses follow the uninterrupted one-process run (every
layout of one config trains that model). A launch on another layout without the conversion is refused
before any process group, naming the command to run.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from train_data import prepare_tiny_dataset
from train_helpers import latest_tag, launch_train, read_status, step_losses

from megakv.cli.convert import main as convert_main
from megakv.train.export import consolidated_state_dict

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS, STOP = 4, 2
MOMENTS = ("fp32", "exp_avg", "exp_avg_sq")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_tiny_dataset(tmp_path_factory.mktemp("universal_data"))


def overrides(dataset: Path, run_dir: Path, pipeline: int, *extra: str) -> list[str]:
    # as tests/test_pipeline_train.py: per-micro-batch R-CLA plans, clipping, ZeRO-1 (all layouts equal one process)
    return [f"data.datasets=[{dataset}]", f"train.run_dir={run_dir}", "parallel.zero_stage=1", f"train.steps={STEPS}",
            "routing.per_micro_batch=true", "routing.q_cross=0.75", "optim.grad_clip=0.5", "validation.every=2",
            f"parallel.pipeline={pipeline}", *extra]


def train(dataset: Path, run_dir: Path, nproc: int, pipeline: int, *extra: str, resume: bool = False) -> Path:
    run = launch_train(overrides(dataset, run_dir, pipeline, *extra), nproc=nproc, resume=resume)
    assert run.ok, f"{run_dir.name} failed with {run.returncodes}:\n{run.output[-6000:]}"
    return run_dir


@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory) -> Path:
    return train(dataset, tmp_path_factory.mktemp("universal_ref") / "single", 1, 1)


def universal_state(run_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Per MegaKVModel parameter: fp32 weight, exp_avg, exp_avg_sq of the run's latest universal conversion."""
    zero = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest_universal").read_text().strip() / "zero"
    return {folder.name: {key: torch.load(folder / f"{key}.pt", weights_only=True)["param"] for key in MOMENTS}
            for folder in zero.iterdir() if folder.is_dir()}


def change_layout(dataset: Path, single: Path, tmp_path: Path, source: tuple[int, int], target: tuple[int, int]):
    """source, target: (processes, pipeline stages)."""
    interrupted = train(dataset, tmp_path / "source", source[0], source[1], f"train.debug.sigterm_at_step={STOP}")
    assert read_status(interrupted)["step"] == STOP and latest_tag(interrupted) == "step_00000002"
    # without the conversion: refused before any process group, naming the command (exit 2)
    refused = launch_train(overrides(dataset, interrupted, target[1]), nproc=target[0], resume=True)
    assert refused.returncodes == [2] * target[0], refused.output[-3000:]
    assert f"megakv-convert to-universal {interrupted}" in refused.output, refused.output[-3000:]
    assert convert_main(["to-universal", str(interrupted)]) == 0
    source_weights = consolidated_state_dict(interrupted)[1]
    source_state = universal_state(interrupted)
    assert set(source_state) == set(source_weights)  # MegaKVModel names, whatever the source layout

    # (a) load on the target layout and save at once: weights and Adam moments are the source's
    probe = tmp_path / "probe"
    shutil.copytree(interrupted, probe)
    train(dataset, probe, target[0], target[1], f"train.steps={STOP}", resume=True)
    assert latest_tag(probe) == "step_00000002" and read_status(probe)["state"] == "finished"
    saved = json.loads((probe / "checkpoints" / "step_00000002" / "megakv_state.json").read_text())["layout"]
    assert (saved["world_size"], saved["pipeline"]) == target  # written by the target layout
    loaded_weights = consolidated_state_dict(probe)[1]  # read from the target layout's own files
    assert loaded_weights.keys() == source_weights.keys()
    for name, weight in source_weights.items():
        assert torch.equal(loaded_weights[name], weight), name
    assert convert_main(["to-universal", str(probe)]) == 0
    loaded_state = universal_state(probe)
    assert loaded_state.keys() == source_state.keys()
    for name, tensors in source_state.items():
        for key in MOMENTS:
            assert torch.equal(loaded_state[name][key], tensors[key]), (name, key)

    # (b) train on from the conversion: the next losses follow the uninterrupted run
    train(dataset, interrupted, target[0], target[1], resume=True)
    assert read_status(interrupted)["state"] == "finished"
    reference, continued = step_losses(single), step_losses(interrupted)
    for step in range(STOP + 1, STEPS + 1):
        assert continued[step] == pytest.approx(reference[step], rel=1e-5), (step, continued, reference)
    ours, theirs = consolidated_state_dict(interrupted)[1], consolidated_state_dict(single)[1]
    assert all(torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-5) for k in theirs)


def test_two_stages_to_one_stage_two_data_ranks(dataset, single, tmp_path):
    change_layout(dataset, single, tmp_path, source=(2, 2), target=(2, 1))


def test_one_stage_to_two_stages(dataset, single, tmp_path):
    change_layout(dataset, single, tmp_path, source=(1, 1), target=(2, 2))


def test_two_stages_two_data_ranks_to_two_stages_one_data_rank(dataset, single, tmp_path):
    change_layout(dataset, single, tmp_path, source=(4, 2), target=(2, 2))
