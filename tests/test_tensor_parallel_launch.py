"""megakv-train with tensor parallelism through the real CLI (real processes, DeepSpeed ZeRO engines on gloo).

TP=2 must train the model one process trains: losses step by step (rel 1e-6), the clipped-with grad norm,
validation at every retention plan, under per-micro-batch R-CLA plans checked equal on every rank. A
SIGTERM'd TP2 run resumes bit for bit. The export (`megakv-convert from-checkpoint`, `--hf`,
`megakv-generate --model RUN_DIR`) merges the tensor shards into the model directory a dense run gives.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from layout_runs import STEPS, assert_same_training, overrides, train
from safetensors.torch import load_file
from train_data import prepare_tiny_dataset
from train_helpers import (
    TINY_RECIPE,
    latest_tag,
    launch_train,
    read_status,
    step_losses,
)

from megakv.cli.convert import main as convert_main
from megakv.cli.generate import main as generate_main
from megakv.config import ConfigError, load_config
from megakv.parallel.layout import ParallelLayout
from megakv.train.checkpoint import file_digest
from megakv.train.export import consolidated_state_dict
from megakv.train.preflight import preflight

pytestmark = [pytest.mark.distributed]

# Adam divides each gradient by its own running RMS, so a last-bit difference in a small gradient (TP sums
# partial products in another order) moves that weight by up to ~lr * 1e-3 after a few steps; measured
# max |TP2 - dense| over all weights after 4 steps at lr 3e-3: 1.6e-6.
EXPORT_ATOL = 1e-5


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_tiny_dataset(tmp_path_factory.mktemp("tensor_launch_data"))










@pytest.fixture(scope="module")
def single(dataset, tmp_path_factory) -> Path:
    return train(dataset, tmp_path_factory.mktemp("tp_ref") / "single", 1)


@pytest.fixture(scope="module")
def tp2(dataset, tmp_path_factory) -> Path:
    return train(dataset, tmp_path_factory.mktemp("tp2") / "tp2", 2, "parallel.tensor=2")


@pytest.mark.slow
def test_two_tensor_ranks_train_the_single_process_model(single, tp2):
    assert_same_training(tp2, single, weights_atol=EXPORT_ATOL)
    # one plan per micro-batch, the same on both tensor ranks, routing across many layers
    lines = (tp2 / "logs" / "plans_rank0.txt").read_text().splitlines()
    assert (tp2 / "logs" / "plans_rank1.txt").read_text().splitlines() == lines
    plans = [[int(s) for s in plan.split()] for line in lines for plan in line.split(" ", 1)[1].split(" | ")]
    assert len(plans) == STEPS * 4
    assert any(plan[layer] != layer for plan in plans for layer in (1, 2, 3))
    assert any(plan[3] <= 1 for plan in plans)  # some route reaches more than one layer back
    names = {p.name for p in (tp2 / "checkpoints" / latest_tag(tp2)).iterdir()}
    assert {"mp_rank_00_model_states.pt", "mp_rank_01_model_states.pt"} <= names
    saved = json.loads((tp2 / "checkpoints" / latest_tag(tp2) / "megakv_state.json").read_text())
    assert saved["layout"]["tensor"] == 2


@pytest.mark.slow
def test_the_export_merges_the_shards_into_the_dense_model_directory(single, tp2, tmp_path, capsys):
    from megakv.model_dir import load_model

    for run in (single, tp2):
        assert convert_main(["from-checkpoint", str(run), str(tmp_path / f"{run.name}_model")]) == 0
        assert convert_main(["from-checkpoint", str(run), str(tmp_path / f"{run.name}_hf"), "--hf"]) == 0
    ours, dense = load_model(tmp_path / "tp2_model").state_dict(), load_model(tmp_path / "single_model").state_dict()
    assert ours.keys() == dense.keys()
    assert all(torch.allclose(ours[k], v, rtol=0, atol=EXPORT_ATOL) for k, v in dense.items())
    # the directories hold the same files and the same config (a dense model, nothing about the tensor split)
    assert sorted(p.name for p in (tmp_path / "tp2_model").iterdir()) == sorted(
        p.name for p in (tmp_path / "single_model").iterdir())
    assert (tmp_path / "tp2_model" / "config.yaml").read_text() == (tmp_path / "single_model" / "config.yaml"
                                                                      ).read_text()
    assert json.loads((tmp_path / "tp2_hf" / "config.json").read_text()) == json.loads(
        (tmp_path / "single_hf" / "config.json").read_text())
    hf_ours, hf_dense = load_file(tmp_path / "tp2_hf" / "model.safetensors"), load_file(
        tmp_path / "single_hf" / "model.safetensors")
    assert hf_ours.keys() == hf_dense.keys()
    assert all(torch.allclose(hf_ours[k], v, rtol=0, atol=EXPORT_ATOL) for k, v in hf_dense.items())
    # megakv-generate reads the TP run directory itself and says what the dense run says (greedy)
    capsys.readouterr()
    said = []
    for run in (single, tp2):
        assert generate_main(["--model", str(run), "--prompt", "The king", "--max-new-tokens", "8"]) == 0
        said.append(capsys.readouterr().out.splitlines()[-1])  # zero_to_fp32 prints its progress above it
    assert said[0] == said[1] and said[0].startswith("The king") and len(said[0]) > len("The king")


@pytest.mark.slow
def test_sigterm_and_resume_on_the_same_layout_is_bit_exact(dataset, tp2, tmp_path):
    interrupted = train(dataset, tmp_path / "interrupted", 2, "parallel.tensor=2", "train.debug.sigterm_at_step=2")
    status = read_status(interrupted)
    assert status["state"] == "preempted" and status["step"] == 2 and latest_tag(interrupted) == "step_00000002"
    train(dataset, interrupted, 2, "parallel.tensor=2", resume=True)
    assert read_status(interrupted)["state"] == "finished"
    reference, continued = step_losses(tp2), step_losses(interrupted)
    for step in (3, 4):
        assert continued[step] == reference[step], (step, continued[step], reference[step])  # bit for bit
    ours, theirs = consolidated_state_dict(interrupted)[1], consolidated_state_dict(tp2)[1]
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)


@pytest.mark.slow
def test_two_tensor_ranks_with_activation_checkpointing(dataset, single, tmp_path):
    # each tensor rank recomputes its shard of every block in the backward, the row-parallel all-reduces again
    run = train(dataset, tmp_path / "tp2_recompute", 2, "parallel.tensor=2", "train.activation_checkpointing=true")
    assert_same_training(run, single, weights_atol=EXPORT_ATOL)


@pytest.mark.slow
def test_two_tensor_by_two_data_parallel_ranks(dataset, single, tmp_path):
    # ranks 0,1 and 2,3 split the heads; ZeRO-1 partitions and reduces over data ranks {0,2} and {1,3}
    run = train(dataset, tmp_path / "tp2dp2", 4, "parallel.tensor=2")
    assert_same_training(run, single, weights_atol=EXPORT_ATOL)
    assert json.loads((run / "checkpoints" / latest_tag(run) / "megakv_state.json").read_text())["layout"][
        "data_parallel"] == 2
    names = {p.name for p in (run / "checkpoints" / latest_tag(run)).iterdir()}
    assert {f"zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt" for d in (0, 1) for t in (0, 1)} <= names


@pytest.mark.slow
def test_one_plan_per_step(dataset, tmp_path):
    reference = train(dataset, tmp_path / "single_per_step", 1, "routing.per_micro_batch=false")
    run = train(dataset, tmp_path / "tp2_per_step", 2, "parallel.tensor=2", "routing.per_micro_batch=false")
    assert_same_training(run, reference, weights_atol=EXPORT_ATOL)
    lines = (run / "logs" / "plans_rank0.txt").read_text().splitlines()
    assert len(lines) == STEPS and (run / "logs" / "plans_rank1.txt").read_text().splitlines() == lines


@pytest.mark.slow
def test_mqa_with_replicated_kv_heads_tied_embeddings_and_zero2(dataset, tmp_path):
    # one K/V head for two tensor ranks: both hold a replica; the head shares the embedding's weight
    extra = ("model.n_kv_heads=1", "model.tie_embeddings=true", "parallel.zero_stage=2")
    reference = train(dataset, tmp_path / "single_mqa", 1, *extra)
    run = train(dataset, tmp_path / "tp2_mqa", 2, "parallel.tensor=2", *extra)
    assert_same_training(run, reference, weights_atol=EXPORT_ATOL)


@pytest.mark.slow
def test_bf16_export_rebuilds_the_fp32_masters_of_every_tensor_rank(dataset, tmp_path):
    from megakv.parallel.tensor_files import tensor_shards
    from megakv.parallel.tensor_split import merge_state_dicts, tensor_split

    run = train(dataset, tmp_path / "tp2_bf16", 2, "parallel.tensor=2", "train.precision=bf16")
    cfg, masters, tag = consolidated_state_dict(run)  # from the optimizer's flat fp32 partitions
    module_shards = tensor_shards(run / "checkpoints" / tag, 2, masters=False)  # the bf16 weights, as fp32
    modules = merge_state_dicts(module_shards, tensor_split(cfg, 2))
    assert masters.keys() == modules.keys()
    assert any(not torch.equal(masters[k], modules[k]) for k in masters)  # the masters carry more bits
    for name, weight in modules.items():
        assert masters[name].dtype == torch.float32
        assert torch.equal(masters[name].bfloat16().float(), weight), name  # the module weights are rounded masters


def _config(dataset: Path, tmp_path: Path, *extra: str):
    return load_config(TINY_RECIPE, overrides(dataset, tmp_path / "run", *extra))


@pytest.mark.slow  # the two-process launch
def test_layouts_tensor_parallelism_cannot_run_are_refused_before_any_process_group(dataset, tmp_path):
    with pytest.raises(ConfigError) as zero3:
        preflight(_config(dataset, tmp_path, "parallel.tensor=2", "parallel.zero_stage=3"),
                  ParallelLayout(world_size=2, rank=0, local_rank=0, tensor=2))
    assert zero3.value.field == "parallel.zero_stage" and "ZeRO-3" in str(zero3.value)
    launched = launch_train(overrides(dataset, tmp_path / "refused", "parallel.tensor=2", "parallel.zero_stage=3"),
                            nproc=2, timeout=120)
    assert launched.returncodes == [2, 2], launched.output[-3000:]
    assert "parallel.zero_stage" in launched.output and "ZeRO-3" in launched.output


class Payload:
    """Unpickling this runs `touch MARKER` (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_the_export_reads_every_tensor_rank_through_the_weights_only_loader(tp2, tmp_path, capsys):
    import shutil

    run = tmp_path / "poisoned"
    shutil.copytree(tp2, run)
    marker = tmp_path / "payload-ran"
    shard = run / "checkpoints" / latest_tag(run) / "mp_rank_01_model_states.pt"
    contents = torch.load(shard, weights_only=False)  # our own file, about to be poisoned
    contents["extra"] = Payload(marker)
    torch.save(contents, shard)
    state_file = shard.parent / "megakv_state.json"  # a sender re-records the manifest to match
    state = json.loads(state_file.read_text())
    state["files"] = {str(p.relative_to(shard.parent)): [p.stat().st_size, file_digest(p)]
                      for p in sorted(shard.parent.rglob("*")) if p.is_file() and p.name != state_file.name}
    state_file.write_text(json.dumps(state))
    assert convert_main(["from-checkpoint", str(run), str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err
    assert str(shard) in err and "system" in err
    assert not marker.exists() and not (tmp_path / "exported").exists()
