"""Tensor parallelism inside pipeline stages (TP x PP, TP x PP x DP) through the real CLI: real processes,
DeepSpeed's pipeline engine on gloo.

Every layout must train the model one process trains: losses step by step (rel 1e-6), the clipped-with grad
norm (DeepSpeed's global norm over split and replicated parameters), validation at every retention, under
per-micro-batch R-CLA plans that route across the stage boundary, checked equal on every rank. Each tensor
rank packs its own K/V heads into the tensor crossing the boundary. A resume on the same layout is bit for
bit; the export merges every (stage, tensor rank) shard into the dense model directory; a universal
conversion of (TP2, PP2, DP1) resumes as (TP1, PP1, DP2), and one of a one-process run as (TP2, PP2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from layout_runs import STEPS, assert_same_training, train
from safetensors.torch import load_file
from train_data import prepare_tiny_dataset
from train_helpers import latest_tag, read_status, step_losses

from megakv.cli.convert import main as convert_main
from megakv.parallel.pipeline_files import layer_files_state, master_weights_state
from megakv.parallel.tensor_split import tensor_split
from megakv.train.checkpoint import write_pointer
from megakv.train.export import consolidated_state_dict

pytestmark = [pytest.mark.distributed]

TP2_PP2 = ("parallel.tensor=2", "parallel.pipeline=2")
KEEP_STEP_2 = ("checkpoint.every=2", "checkpoint.keep_last=2")  # the step-2 checkpoint seeds the resumes
# TP sums partial products in another order; Adam turns last-bit gradient differences into weight differences
# of up to ~lr * 1e-3 after a few steps (measured max |TP2xPP2 - dense| after 4 steps: 1.6e-6).
EXPORT_ATOL = 1e-5
MOMENTS = ("fp32", "exp_avg", "exp_avg_sq")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_tiny_dataset(tmp_path_factory.mktemp("tensor_pipeline_data"))


@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory) -> Path:
    return train(dataset, tmp_path_factory.mktemp("tpp_ref") / "single", 1, *KEEP_STEP_2)


@pytest.fixture(scope="module")
def tp2pp2(dataset, tmp_path_factory) -> Path:
    return train(dataset, tmp_path_factory.mktemp("tp2pp2") / "tp2pp2", 4, *TP2_PP2, *KEEP_STEP_2)


def from_step_two(run: Path, copy: Path) -> Path:
    """A copy of `run` whose newest checkpoint is step 2 (its later checkpoint and metrics removed)."""
    shutil.copytree(run, copy)
    checkpoints = copy / "checkpoints"
    shutil.rmtree(checkpoints / "step_00000004")
    write_pointer(checkpoints, "step_00000002")
    (copy / "metrics.jsonl").unlink()
    return copy


def test_two_tensor_ranks_in_two_stages_train_the_single_process_model(single, tp2pp2, tmp_path):
    assert_same_training(tp2pp2, single, weights_atol=EXPORT_ATOL)
    # one plan per micro-batch, the same on all four ranks, and some route crosses the stage boundary
    traces = {rank: (tp2pp2 / "logs" / f"plans_rank{rank}.txt").read_text().splitlines() for rank in range(4)}
    assert all(lines == traces[0] for lines in traces.values())
    plans = [[int(s) for s in plan.split()] for line in traces[0] for plan in line.split(" ", 1)[1].split(" | ")]
    assert len(plans) == STEPS * 4 and any(p[layer] < 2 for p in plans for layer in (2, 3))
    tag_dir = tp2pp2 / "checkpoints" / latest_tag(tp2pp2)
    names = {p.name for p in tag_dir.iterdir()}  # a file per layer and tensor rank; DeepSpeed's mp rank: stage x 2 + t
    assert {f"layer_{i:02d}-model_{t:02d}-model_states.pt" for i in range(7) for t in (0, 1)} <= names
    assert {f"zero_pp_rank_0_mp_rank_{m:02d}_optim_states.pt" for m in range(4)} <= names
    layout = json.loads((tag_dir / "megakv_state.json").read_text())["layout"]
    assert (layout["tensor"], layout["pipeline"], layout["data_parallel"]) == (2, 2, 1)
    # the optimizer's fp32 masters (what a bf16 run exports), merged from the four (stage, tensor rank) files,
    # are the layer files' weights in an fp32 run
    split = tensor_split(consolidated_state_dict(single)[0], 2)
    layer_files, masters = layer_files_state(tag_dir, 4, split), master_weights_state(tag_dir, 4, split)
    assert layer_files.keys() == masters.keys() and all(torch.equal(masters[k], v) for k, v in layer_files.items())

    # the export merges the shards of both stages and both tensor ranks into the dense model directory
    from megakv.model_dir import load_model

    for run in (single, tp2pp2):
        assert convert_main(["from-checkpoint", str(run), str(tmp_path / f"{run.name}_model")]) == 0
        assert convert_main(["from-checkpoint", str(run), str(tmp_path / f"{run.name}_hf"), "--hf"]) == 0
    ours, dense = load_model(tmp_path / "tp2pp2_model").state_dict(), load_model(tmp_path / "single_model").state_dict()
    assert ours.keys() == dense.keys()
    assert all(torch.allclose(ours[k], v, rtol=0, atol=EXPORT_ATOL) for k, v in dense.items())
    assert sorted(p.name for p in (tmp_path / "tp2pp2_model").iterdir()) == sorted(
        p.name for p in (tmp_path / "single_model").iterdir())
    assert (tmp_path / "tp2pp2_model" / "config.yaml").read_text() == (tmp_path / "single_model" / "config.yaml"
                                                                        ).read_text()
    assert json.loads((tmp_path / "tp2pp2_hf" / "config.json").read_text()) == json.loads(
        (tmp_path / "single_hf" / "config.json").read_text())
    hf_ours = load_file(tmp_path / "tp2pp2_hf" / "model.safetensors")
    hf_dense = load_file(tmp_path / "single_hf" / "model.safetensors")
    assert hf_ours.keys() == hf_dense.keys()
    assert all(torch.allclose(hf_ours[k], v, rtol=0, atol=EXPORT_ATOL) for k, v in hf_dense.items())


def test_resume_on_the_same_layout_is_bit_exact(dataset, tp2pp2, tmp_path):
    resumed = from_step_two(tp2pp2, tmp_path / "resumed")
    train(dataset, resumed, 4, *TP2_PP2, *KEEP_STEP_2, resume=True)
    assert read_status(resumed)["state"] == "finished"
    reference, continued = step_losses(tp2pp2), step_losses(resumed)
    assert sorted(continued) == [3, 4]
    for step in (3, 4):
        assert continued[step] == reference[step], (step, continued[step], reference[step])  # bit for bit
    ours, theirs = consolidated_state_dict(resumed)[1], consolidated_state_dict(tp2pp2)[1]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


def assert_continues_single(single, source, layout: tuple[int, int, int]) -> None:
    """`source`, resumed from step 2 on `layout` (tensor, pipeline, data), saved that layout and follows the
    uninterrupted one-process run: steps 3-4 losses and the final weights."""
    saved = json.loads((source / "checkpoints" / latest_tag(source) / "megakv_state.json").read_text())["layout"]
    assert (saved["tensor"], saved["pipeline"], saved["data_parallel"]) == layout
    reference, continued = step_losses(single), step_losses(source)
    assert sorted(continued) == [3, 4]
    for step in (3, 4):
        assert continued[step] == pytest.approx(reference[step], rel=1e-5), (step, continued, reference)
    ours, theirs = consolidated_state_dict(source)[1], consolidated_state_dict(single)[1]
    assert all(torch.allclose(ours[k], theirs[k], rtol=0, atol=EXPORT_ATOL) for k in theirs)


def test_universal_conversion_resumes_as_two_data_ranks(dataset, single, tp2pp2, tmp_path):
    source = from_step_two(tp2pp2, tmp_path / "source")
    assert convert_main(["to-universal", str(source)]) == 0
    checkpoints = source / "checkpoints"
    zero = checkpoints / (checkpoints / "latest_universal").read_text().strip() / "zero"
    converted = {folder.name: {key: torch.load(folder / f"{key}.pt", weights_only=True)["param"] for key in MOMENTS}
                 for folder in zero.iterdir() if folder.is_dir()}
    weights = consolidated_state_dict(source)[1]  # the step-2 weights, from the layer files of every shard
    assert converted.keys() == weights.keys()  # MegaKVModel names and shapes: one merged tensor per parameter
    for name, weight in weights.items():
        assert torch.equal(converted[name]["fp32"], weight), name
        assert converted[name]["exp_avg_sq"].shape == weight.shape and converted[name]["exp_avg_sq"].any(), name
    # (TP1, PP1, DP2) trains on from it: the next losses follow the uninterrupted one-process run
    train(dataset, source, 2, *KEEP_STEP_2, resume=True)
    assert_continues_single(single, source, layout=(1, 1, 2))


def test_universal_conversion_of_one_process_resumes_on_two_tensor_ranks_in_two_stages(dataset, single, tmp_path):
    # the other way: each (stage, tensor rank) cuts its shard of its layers out of the MegaKVModel-named files
    source = from_step_two(single, tmp_path / "from_single")
    assert convert_main(["to-universal", str(source)]) == 0
    train(dataset, source, 4, *TP2_PP2, *KEEP_STEP_2, resume=True)
    assert_continues_single(single, source, layout=(2, 2, 1))


@pytest.mark.slow
def test_tensor_by_pipeline_by_data_parallel_with_replicated_kv_heads(dataset, tmp_path):
    # 8 processes: TP2 x PP2 x DP2; MQA (the one K/V head replicated on both tensor ranks, packed across the
    # boundary by each), the head tied to the embedding (held by both end stages), activation checkpointing
    # (tensor peers recompute the same blocks, so the recomputed all-reduces pair up) and the dynamic
    # transport (exactly the crossing K/V, of this tensor rank's width)
    extra = ("model.n_kv_heads=1", "model.tie_embeddings=true")
    reference = train(dataset, tmp_path / "single_mqa", 1, *extra)
    run = train(dataset, tmp_path / "tp2pp2dp2", 8, *TP2_PP2, *extra, "train.activation_checkpointing=true",
                "parallel.pipeline_transport=dynamic")
    assert_same_training(run, reference, weights_atol=EXPORT_ATOL)
    traces = [(run / "logs" / f"plans_rank{rank}.txt").read_text().splitlines() for rank in range(8)]
    assert all(lines == traces[0] for lines in traces)
    names = {p.name for p in (run / "checkpoints" / latest_tag(run)).iterdir()}
    assert {f"zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt" for d in (0, 1) for m in range(4)} <= names
