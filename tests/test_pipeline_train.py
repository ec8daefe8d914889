"""megakv-train with pipeline parallelism (real CLI, real processes, DeepSpeed's pipe engine on gloo).

Every layout of one config must train the same model as one process: PP=2 (tied and untied), PP=4 (K/V
relayed through middle stages), PP2 x DP2, and DP=2 with per-micro-batch plans (plans keyed by the
global micro-batch slot). Losses step by step within 1e-6, the clipped-with grad norm within 1e-5,
validation at every retention plan, and the exported weights. A SIGTERM'd PP=2 run resumes bit for bit;
resuming on another pipeline size is refused with the field to change.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from layout_runs import STEPS, assert_same_training, grad_norms, overrides, train
from train_data import prepare_tiny_dataset
from train_helpers import (
    TINY_RECIPE,
    latest_tag,
    launch_train,
    read_status,
    step_losses,
)

from megakv.cli.convert import main as convert_main
from megakv.config import ConfigError, load_config
from megakv.parallel.layout import ParallelLayout
from megakv.train.checkpoint import LATEST_UNIVERSAL, write_pointer
from megakv.train.export import consolidated_state_dict
from megakv.train.preflight import preflight

pytestmark = [pytest.mark.distributed, pytest.mark.slow]



@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_tiny_dataset(tmp_path_factory.mktemp("pipeline_train_data"))










@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory) -> Path:
    return train(dataset, tmp_path_factory.mktemp("pp_ref") / "single", 1)


def test_two_stages_train_the_single_process_model(dataset, single, tmp_path):
    run = train(dataset, tmp_path / "pp2", 2, "parallel.pipeline=2")
    assert_same_training(run, single)
    # the routed plans really did cross the boundary: some layer >= 2 read a layer < 2
    lines = (run / "logs" / "plans_rank0.txt").read_text().splitlines()
    plans = [[int(s) for s in plan.split()] for line in lines for plan in line.split(" ", 1)[1].split(" | ")]
    assert len(plans) == STEPS * 4 and any(p[layer] < 2 for p in plans for layer in (2, 3))
    assert (run / "logs" / "plans_rank1.txt").read_text().splitlines() == lines
    names = {p.name for p in (run / "checkpoints" / latest_tag(run)).iterdir()}
    assert {"layer_00-model_00-model_states.pt", "layer_06-model_00-model_states.pt"} <= names
    # megakv-convert reads the pipeline run: a model directory with the dense model's weights
    assert convert_main(["from-checkpoint", str(run), str(tmp_path / "model")]) == 0
    from megakv.model_dir import load_model

    exported = load_model(tmp_path / "model").state_dict()
    _, dense, _ = consolidated_state_dict(single)
    assert all(torch.allclose(exported[k], v, rtol=0, atol=1e-6) for k, v in dense.items())


def test_two_stages_with_activation_checkpointing(dataset, single, tmp_path):
    run = train(dataset, tmp_path / "pp2_recompute", 2, "parallel.pipeline=2", "train.activation_checkpointing=true")
    assert json.loads((run / "ds_config.json").read_text())["pipeline"]["use_reentrant"] is False
    assert_same_training(run, single)


def test_data_parallel_per_micro_batch_plans_train_the_single_process_model(dataset, single, tmp_path):
    # each rank's micro-batch k is global slot rank * accumulation + k: same samples, same plan as 1 process
    assert_same_training(train(dataset, tmp_path / "dp2", 2), single)


def test_tied_embeddings_two_stages(dataset, tmp_path):
    reference = train(dataset, tmp_path / "single_tied", 1, "model.tie_embeddings=true")
    run = train(dataset, tmp_path / "pp2_tied", 2, "parallel.pipeline=2", "model.tie_embeddings=true",
                "parallel.pipeline_transport=dynamic")
    assert_same_training(run, reference)
    assert "lm_head.weight" not in consolidated_state_dict(run)[1]


def test_four_stages_relay_kv(dataset, single, tmp_path):
    assert_same_training(train(dataset, tmp_path / "pp4", 4, "parallel.pipeline=4"), single)


def test_two_stages_by_two_data_parallel(dataset, single, tmp_path):
    assert_same_training(train(dataset, tmp_path / "pp2dp2", 4, "parallel.pipeline=2"), single)


def test_sigterm_and_resume_on_the_same_layout_is_bit_exact(dataset, tmp_path):
    straight = train(dataset, tmp_path / "straight", 2, "parallel.pipeline=2")
    interrupted = train(dataset, tmp_path / "interrupted", 2, "parallel.pipeline=2", "train.debug.sigterm_at_step=2")
    status = read_status(interrupted)
    assert status["state"] == "preempted" and status["step"] == 2 and latest_tag(interrupted) == "step_00000002"
    # another pipeline size is refused before any process group, naming the field
    refused = launch_train(overrides(dataset, interrupted, "parallel.pipeline=1"), nproc=1, resume=True)
    assert refused.returncodes == [2] and "parallel.pipeline" in refused.output, refused.output[-3000:]
    # a universal folder without the MegaKVModel-named parameters (an old or partial conversion) is refused
    # (real conversions: tests/test_universal_layouts.py)
    moved = tmp_path / "moved"
    shutil.copytree(interrupted, moved)
    (moved / "checkpoints" / "step_00000002_universal").mkdir()
    write_pointer(moved / "checkpoints", "step_00000002_universal", LATEST_UNIVERSAL)
    cfg = load_config(TINY_RECIPE, [*overrides(dataset, moved, "parallel.pipeline=2"), "checkpoint.resume=auto"])
    with pytest.raises(ConfigError) as refused_universal:
        preflight(cfg, ParallelLayout(world_size=4, rank=0, local_rank=0, pipeline=2))
    assert refused_universal.value.field == "checkpoint.resume" and "launch 2 processes" in str(refused_universal.value)
    train(dataset, interrupted, 2, "parallel.pipeline=2", resume=True)
    assert read_status(interrupted)["state"] == "finished"
    reference, continued = step_losses(straight), step_losses(interrupted)
    for step in (3, 4):
        assert continued[step] == reference[step], (step, continued[step], reference[step])  # bit for bit
    ours, theirs = consolidated_state_dict(interrupted)[1], consolidated_state_dict(straight)[1]
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    saved = json.loads((interrupted / "checkpoints" / latest_tag(interrupted) / "megakv_state.json").read_text())
    assert saved["layout"]["pipeline"] == 2


def test_bf16_two_stages_and_the_export_of_its_fp32_masters(dataset, tmp_path):
    reference = train(dataset, tmp_path / "single_bf16", 1, "train.precision=bf16")
    run = train(dataset, tmp_path / "pp2_bf16", 2, "parallel.pipeline=2", "train.precision=bf16")
    ours, theirs = step_losses(run), step_losses(reference)
    for step in theirs:  # bf16 rounding differs with the reduction order; the runs stay together
        assert ours[step] == pytest.approx(theirs[step], rel=1e-4), (step, ours, theirs)
    from megakv.parallel.pipeline_files import layer_files_state

    _, masters, _ = consolidated_state_dict(run)  # rebuilt from the optimizer's flat fp32 partitions
    layer_files = layer_files_state(run / "checkpoints" / latest_tag(run), 4)  # the bf16 module weights
    assert masters.keys() == layer_files.keys()
    for name, weight in layer_files.items():
        assert weight.dtype == torch.bfloat16 and masters[name].dtype == torch.float32
        assert torch.equal(masters[name].bfloat16(), weight), name  # the module weights are the rounded masters


def test_sigkill_while_saving_keeps_the_previous_checkpoint(dataset, single, tmp_path):
    """PP2: SIGKILL in the middle of the step-4 save leaves step 2 the complete latest;
    --resume auto continues from it and the run still equals the one-process run."""
    run_dir = tmp_path / "killed"
    crash = launch_train(overrides(dataset, run_dir, "parallel.pipeline=2", "checkpoint.every=2",
                                   "train.debug.sigkill_while_saving_step=4"), nproc=2)
    assert not crash.ok
    ckpts = run_dir / "checkpoints"
    assert latest_tag(run_dir) == "step_00000002" and (ckpts / "step_00000002" / "megakv_state.json").is_file()
    assert not (ckpts / "step_00000004").exists()
    train(dataset, run_dir, 2, "parallel.pipeline=2", "checkpoint.every=2", resume=True)
    assert read_status(run_dir)["state"] == "finished" and latest_tag(run_dir) == "step_00000004"
    assert not list(ckpts.glob(".tmp-*"))  # the partial save was cleaned up at the next start
    ours, theirs = step_losses(run_dir), step_losses(single)
    for step in (3, 4):
        assert ours[step] == pytest.approx(theirs[step], rel=1e-6), (step, ours[step], theirs[step])


def test_a_launch_note_about_the_config_is_printed_once_not_per_rank(dataset, tmp_path):
    """Every rank printed the same config notes (the pipeline bubble warning, resume's changed settings): the
    console showed each once per rank. Rank 0 says them; the other ranks' log files keep the resume notes."""
    base = [*overrides(dataset, tmp_path / "run", "parallel.pipeline=2", "train.global_batch=2",
                       "train.micro_batch=2", "validation.every=0", "train.steps=2")]
    first = launch_train([*base, "train.debug.sigterm_at_step=1"], nproc=2)
    assert first.ok, first.output[-4000:]
    assert first.output.count("pipeline bubble") == 1, first.output[-4000:]
    again = launch_train([*base, "optim.lr=0.002"], nproc=2, resume=True)
    assert again.ok, again.output[-4000:]
    assert again.output.count("resuming with a changed setting: optim.lr") == 1
    assert "resuming with a changed setting: optim.lr" in (tmp_path / "run" / "logs" / "rank1.log").read_text()


@pytest.mark.parametrize("stage, nproc", [(2, 1), (3, 1), (2, 2)],
                         ids=["zero2", "zero3", "zero2-dp2"])
def test_optimizer_offload_with_a_plan_per_micro_batch_trains_the_single_process_model(dataset, single, tmp_path,
                                                                                       stage, nproc):
    """Offloaded ZeRO-2/3 (DeepSpeed 0.19's CPU gradient copies) lost what a K/V projection accumulated in earlier
    micro-batches when the boundary micro-batch's plan did not read it (layout audit: step-1 grad norm 1.6241
    against 1.6330, on one process as on two). Every layer's K/V now runs in every micro-batch under offload."""
    run = train(dataset, tmp_path / f"offload-z{stage}-{nproc}", nproc, f"parallel.zero_stage={stage}",
                "parallel.offload_optimizer=cpu")
    # ZeRO-3's partitioned sums round apart from ZeRO-1's: its weights are 1.7e-6 off after 4 steps, offload or not
    assert_same_training(run, single, weights_atol=1e-5 if stage == 3 else 1e-6)


def test_two_stages_with_optimizer_offload_train_the_single_process_model(dataset, tmp_path):
    """PP2 with offload applied an unread K/V projection's previous gradient again (layout audit: layer 2's K/V
    read in step 1, unread in step 2; from step 5 on the losses parted, grad norm 7% off at step 6). One plan per
    step, 8 steps, so layers go unread in some steps after being read in others."""
    steps = ["train.steps=8", "routing.per_micro_batch=false", "validation.every=4"]
    reference = launch_train(overrides(dataset, tmp_path / "single", *steps), nproc=1)
    assert reference.ok, reference.output[-6000:]
    run = launch_train(overrides(dataset, tmp_path / "pp2-offload", *steps, "parallel.pipeline=2",
                                 "parallel.offload_optimizer=cpu"), nproc=2)
    assert run.ok, run.output[-6000:]
    ours, theirs = step_losses(tmp_path / "pp2-offload"), step_losses(tmp_path / "single")
    assert sorted(ours) == sorted(theirs) == list(range(1, 9))
    for step in theirs:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-6), (step, ours, theirs)
    norms, reference_norms = grad_norms(tmp_path / "pp2-offload"), grad_norms(tmp_path / "single")
    for step, norm in reference_norms.items():
        assert norms[step] == pytest.approx(norm, rel=1e-5), (step, norms, reference_norms)
    # stopped after step 3 and resumed: the straight PP2 offload run's losses, bit for bit
    layout = [*steps, "parallel.pipeline=2", "parallel.offload_optimizer=cpu", "checkpoint.every=2"]
    stopped = launch_train(overrides(dataset, tmp_path / "stopped", *layout, "train.debug.sigterm_at_step=3"), nproc=2)
    assert stopped.ok, stopped.output[-6000:]
    resumed = launch_train(overrides(dataset, tmp_path / "stopped", *layout), nproc=2, resume=True)
    assert resumed.ok, resumed.output[-6000:]
    assert step_losses(tmp_path / "stopped") == ours
