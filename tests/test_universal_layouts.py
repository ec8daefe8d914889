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
from train_helpers import TINY_RECIPE, latest_tag, launch_train, read_status, step_losses

from megakv.cli.convert import main as convert_main
from megakv.config import ConfigError, load_config, to_yaml
from megakv.parallel.layout import ParallelLayout
from megakv.train.checkpoint import LATEST_UNIVERSAL, write_pointer
from megakv.train.export import consolidated_state_dict
from megakv.train.preflight import preflight
from megakv.train.state import TrainState

STEPS, STOP = 4, 2
MOMENTS = ("fp32", "exp_avg", "exp_avg_sq")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_tiny_dataset(tmp_path_factory.mktemp("universal_data"))


def overrides(dataset: Path, run_dir: Path, pipeline: int, *extra: str, tensor: int = 1) -> list[str]:
    # as tests/test_pipeline_train.py: per-micro-batch R-CLA plans, clipping, ZeRO-1 (all layouts equal one process)
    return [f"data.datasets=[{dataset}]", f"train.run_dir={run_dir}", "parallel.zero_stage=1", f"train.steps={STEPS}",
            "routing.per_micro_batch=true", "routing.q_cross=0.75", "optim.grad_clip=0.5", "validation.every=2",
            f"parallel.pipeline={pipeline}", f"parallel.tensor={tensor}", *extra]


def train(dataset: Path, run_dir: Path, nproc: int, pipeline: int, *extra: str, resume: bool = False,
          tensor: int = 1) -> Path:
    run = launch_train(overrides(dataset, run_dir, pipeline, *extra, tensor=tensor), nproc=nproc, resume=resume)
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


def change_layout(dataset: Path, single: Path, tmp_path: Path, source: tuple[int, ...], target: tuple[int, ...],
                  *extra: str):
    """source, target: (processes, pipeline stages[, tensor degree]); `single`: the one-process run of the
    same config."""
    tensor = source[2] if len(source) > 2 else 1
    target_tensor = target[2] if len(target) > 2 else 1
    interrupted = train(dataset, tmp_path / "source", source[0], source[1], f"train.debug.sigterm_at_step={STOP}",
                        *extra, tensor=tensor)
    assert read_status(interrupted)["step"] == STOP and latest_tag(interrupted) == "step_00000002"
    # without the conversion: refused before any process group, naming the command (exit 2)
    refused = launch_train(overrides(dataset, interrupted, target[1], *extra, tensor=target_tensor), nproc=target[0],
                           resume=True)
    assert refused.returncodes == [2] * target[0], refused.output[-3000:]
    assert f"megakv-convert to-universal {interrupted}" in refused.output, refused.output[-3000:]
    assert convert_main(["to-universal", str(interrupted)]) == 0
    made_from = TrainState.read(interrupted / "checkpoints" / "step_00000002_universal").converted_from
    assert made_from == TrainState.read(interrupted / "checkpoints" / "step_00000002").manifest_digest()
    source_weights = consolidated_state_dict(interrupted)[1]
    source_state = universal_state(interrupted)
    assert set(source_state) == set(source_weights)  # MegaKVModel names, whatever the source layout

    # (a) load on the target layout and save at once: weights and Adam moments are the source's
    probe = tmp_path / "probe"
    shutil.copytree(interrupted, probe)
    train(dataset, probe, target[0], target[1], f"train.steps={STOP}", *extra, resume=True, tensor=target_tensor)
    assert latest_tag(probe) == "step_00000002" and read_status(probe)["state"] == "finished"
    saved = json.loads((probe / "checkpoints" / "step_00000002" / "megakv_state.json").read_text())["layout"]
    assert (saved["world_size"], saved["pipeline"], saved["tensor"]) == (*target[:2], target_tensor)
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
    train(dataset, interrupted, target[0], target[1], *extra, resume=True, tensor=target_tensor)
    assert read_status(interrupted)["state"] == "finished"
    reference, continued = step_losses(single), step_losses(interrupted)
    for step in range(STOP + 1, STEPS + 1):
        assert continued[step] == pytest.approx(reference[step], rel=1e-5), (step, continued, reference)
    ours, theirs = consolidated_state_dict(interrupted)[1], consolidated_state_dict(single)[1]
    assert all(torch.allclose(ours[k], theirs[k], rtol=0, atol=1e-5) for k in theirs)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_stages_to_one_stage_two_data_ranks(dataset, single, tmp_path):
    change_layout(dataset, single, tmp_path, source=(2, 2), target=(2, 1))


@pytest.mark.distributed
@pytest.mark.slow
def test_one_stage_to_two_stages_tied_embeddings(dataset, tmp_path):
    # the pipe engine holds the tied embedding on both end stages ('tied_modules.embed.embed.weight')
    tied = "model.tie_embeddings=true"
    reference = train(dataset, tmp_path / "single_tied", 1, 1, tied)
    change_layout(dataset, reference, tmp_path, (1, 1), (2, 2), tied)


@pytest.mark.distributed
@pytest.mark.slow
def test_two_stages_two_data_ranks_to_two_stages_one_data_rank(dataset, single, tmp_path):
    change_layout(dataset, single, tmp_path, source=(4, 2), target=(2, 2))


def fake_checkpoint(dataset: Path, run_dir: Path, *extra: str, **layout: int) -> None:
    """A checkpoint directory as far as preflight and the converter read it before touching any shard."""
    cfg = load_config(TINY_RECIPE, overrides(dataset, run_dir, layout.get("pipeline", 1), *extra))
    tag_dir = run_dir / "checkpoints" / "step_00000002"
    tag_dir.mkdir(parents=True)
    TrainState(step=2, layout={"data_parallel": 1, **layout}, config_yaml=to_yaml(cfg)).write(tag_dir)
    write_pointer(run_dir / "checkpoints", "step_00000002")


def fake_universal(run_dir: Path, files: dict[str, bytes] | None = None) -> Path:
    """An intact conversion as preflight reads it: MegaKVModel-named folders and a manifest of its files."""
    from megakv.train.checkpoint import manifest_of

    target = run_dir / "checkpoints" / "step_00000002_universal"
    (target / "zero" / "embed.weight").mkdir(parents=True)
    for name, content in (files or {}).items():
        (target / name).write_bytes(content)
    state = TrainState.read(run_dir / "checkpoints" / "step_00000002")
    state.files = manifest_of(target, list(files or {}))
    state.write(target)
    write_pointer(run_dir / "checkpoints", target.name, LATEST_UNIVERSAL)
    return target


def test_a_damaged_conversion_is_refused(dataset, tmp_path):
    """A changed file of a conversion trained on silently, a missing one crashed in DeepSpeed: the manifest the
    conversion writes is now checked before loading."""
    run = tmp_path / "run"
    fake_checkpoint(dataset, run, pipeline=2)
    weights = "zero/embed.weight/fp32.pt"
    target = fake_universal(run, {weights: b"weights" * 100})
    cfg = load_config(TINY_RECIPE, [*overrides(dataset, run, 1), "checkpoint.resume=auto"])
    assert preflight(cfg, ParallelLayout(world_size=2, rank=0, local_rank=0)).resume.universal  # intact: used
    (target / weights).write_bytes(b"weighTs" * 100)
    with pytest.raises(ConfigError, match=r"its conversion is damaged: .*fp32.pt does not match the checksum"):
        preflight(cfg, ParallelLayout(world_size=2, rank=0, local_rank=0))
    (target / weights).unlink()
    with pytest.raises(ConfigError, match=r"its conversion is damaged: .*fp32.pt is missing") as missing:
        preflight(cfg, ParallelLayout(world_size=2, rank=0, local_rank=0))
    assert f"megakv-convert to-universal {run}` again" in missing.value.fix


def test_a_conversion_of_a_step_saved_again_since_is_refused(dataset, tmp_path):
    """Step 2 converted, then saved again (its checkpoint deleted and retrained, say at another lr): the
    resume on another layout loaded the old conversion with no warning (step 3's loss 4.9956 instead of
    5.2387). A conversion records the manifest of the checkpoint it was made from."""
    run = tmp_path / "run"
    fake_checkpoint(dataset, run, pipeline=2)
    tag_dir = run / "checkpoints" / "step_00000002"
    from megakv.train.checkpoint import manifest_of

    source, weights = TrainState.read(tag_dir), "mp_rank_00_model_states.pt"
    (tag_dir / weights).write_bytes(b"first save")
    source.files = manifest_of(tag_dir, [weights])
    source.write(tag_dir)
    target = fake_universal(run)
    converted = TrainState.read(target)
    converted.converted_from = source.manifest_digest()
    converted.write(target)
    cfg = load_config(TINY_RECIPE, [*overrides(dataset, run, 1), "checkpoint.resume=auto"])
    assert preflight(cfg, ParallelLayout(world_size=2, rank=0, local_rank=0)).resume.universal  # its source: used
    (tag_dir / weights).write_bytes(b"saved again")  # the step saved again, intact
    source.files = manifest_of(tag_dir, [weights])
    source.write(tag_dir)
    with pytest.raises(ConfigError, match="was made from an earlier checkpoint saved as step_00000002") as stale:
        preflight(cfg, ParallelLayout(world_size=2, rank=0, local_rank=0))
    assert f"megakv-convert to-universal {run}` again" in stale.value.fix


def test_a_zero3_run_on_another_layout_is_refused(dataset, tmp_path):
    """DeepSpeed 0.19's ZeRO-3 universal load shares one Adam step counter between the parameter groups and
    gives every group the first one's weight decay: resumed on 1 rank from 2, the loss drifted 1.4e-3 by the
    third step, with no warning (helper audit). Refused, naming the two ways that work."""
    run = tmp_path / "run"
    zero3 = ("parallel.zero_stage=3", "routing.per_micro_batch=false")
    fake_checkpoint(dataset, run, *zero3, data_parallel=2, zero_stage=3)
    fake_universal(run)
    cfg = load_config(TINY_RECIPE, [*overrides(dataset, run, 1, *zero3), "checkpoint.resume=auto"])
    with pytest.raises(ConfigError, match="cannot load a ZeRO-3 optimizer state into another layout") as refused:
        preflight(cfg, ParallelLayout(world_size=1, rank=0, local_rank=0))
    assert "parallel.zero_stage=3" in refused.value.fix and "checkpoint.init_from" in refused.value.fix
    assert not preflight(cfg, ParallelLayout(world_size=2, rank=0, local_rank=0)).resume.universal  # same layout


def test_another_pipeline_size_names_the_conversion_to_run(dataset, tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(dataset, run, pipeline=2)
    cfg = load_config(TINY_RECIPE, [*overrides(dataset, run, 1), "checkpoint.resume=auto"])
    with pytest.raises(ConfigError) as refused:
        preflight(cfg, ParallelLayout(world_size=2, rank=0, local_rank=0))
    assert refused.value.field == "checkpoint.resume"
    assert f"megakv-convert to-universal {run}" in refused.value.fix
    assert "1 data-parallel rank(s) x 2 pipeline stage(s)" in str(refused.value)
    # a universal folder without MegaKVModel-named parameters (an older or partial conversion): convert again
    (run / "checkpoints" / "step_00000002_universal" / "zero").mkdir(parents=True)
    write_pointer(run / "checkpoints", "step_00000002_universal", LATEST_UNIVERSAL)
    with pytest.raises(ConfigError) as stale:
        preflight(cfg, ParallelLayout(world_size=2, rank=0, local_rank=0))
    assert f"megakv-convert to-universal {run}` again" in stale.value.fix



def test_another_cut_of_the_same_pipeline_names_the_conversion_to_run(dataset, tmp_path):
    """4 stages of 8 blocks: uniform cuts [0, 2, 4, 6, 8], parameters (the embedding and head weigh on the end
    stages) [0, 1, 2, 7, 8]. Each stage's optimizer shard holds its own blocks, so resuming with the other
    partition is another layout, not a native load."""
    run = tmp_path / "run"
    shape = ["model.n_layers=8", "model.vocab_size=4096"]
    cfg = load_config(TINY_RECIPE, [*overrides(dataset, run, 4), *shape])
    tag_dir = run / "checkpoints" / "step_00000002"
    tag_dir.mkdir(parents=True)
    TrainState(step=2, layout={"data_parallel": 1, "pipeline": 4, "zero_stage": 1},
               config_yaml=to_yaml(cfg)).write(tag_dir)
    write_pointer(run / "checkpoints", "step_00000002")
    four_stages = ParallelLayout(world_size=4, rank=0, local_rank=0, pipeline=4)
    same = load_config(TINY_RECIPE, [*overrides(dataset, run, 4), *shape, "checkpoint.resume=auto"])
    assert not preflight(same, four_stages).resume.universal
    other = load_config(TINY_RECIPE, [*overrides(dataset, run, 4), *shape, "parallel.pipeline_partition=parameters",
                                      "checkpoint.resume=auto"])
    with pytest.raises(ConfigError) as refused:
        preflight(other, four_stages)
    assert "stages cut at blocks [0, 2, 4, 6, 8], now [0, 1, 2, 7, 8]" in str(refused.value)
    assert f"megakv-convert to-universal {run}" in refused.value.fix

@pytest.mark.distributed
@pytest.mark.slow
def test_two_tensor_ranks_to_two_data_ranks_replicated_kv_heads(dataset, tmp_path):
    # MQA: one K/V head, replicated on both tensor ranks; megakv merges the shards (not ds_to_universal)
    extra = ("model.n_kv_heads=1",)
    reference = train(dataset, tmp_path / "single_mqa", 1, 1, *extra)
    change_layout(dataset, reference, tmp_path, (2, 1, 2), (2, 1), *extra)


@pytest.mark.distributed
@pytest.mark.slow
def test_one_process_to_two_tensor_ranks(dataset, single, tmp_path):
    # GQA, 2 K/V heads: DeepSpeed cuts each tensor along megakv's split dimension (o_proj / down_proj: 1)
    change_layout(dataset, single, tmp_path, (1, 1), (2, 1, 2))


def test_universal_checkpoints_tensor_parallelism_cannot_load_are_refused(dataset, tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(dataset, run, pipeline=1)
    fake_universal(run)

    def refusal(tensor: int) -> ConfigError:
        cfg = load_config(TINY_RECIPE, [*overrides(dataset, run, 1, tensor=tensor), "checkpoint.resume=auto"])
        with pytest.raises(ConfigError) as refused:
            preflight(cfg, ParallelLayout(world_size=tensor, rank=0, local_rank=0, tensor=tensor))
        assert refused.value.field == "parallel.tensor" and "parallel.tensor=1" in refused.value.fix
        return refused.value

    # a conversion that does not record the split dimensions (older): convert again
    assert f"megakv-convert to-universal {run}` again" in refusal(2).fix
    # tiny's 2 K/V heads over 4 tensor ranks: each head on 2 ranks, which DeepSpeed's cut cannot produce
    (run / "checkpoints" / "step_00000002_universal" / "zero" / "megakv_split_dims.json").write_text("{}")
    assert "replicated on 2 tensor ranks" in str(refusal(4))
