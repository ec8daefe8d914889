"""megakv-train end to end on 2 gloo processes: ZeRO 1/2/3 with R-CLA, plans agree, exact resume after
SIGTERM or a SIGKILL in the middle of a save, universal resume on 1 rank, non-finite steps, bf16 on 2 ranks.

Every launch is the real CLI in real processes (plain env://, torchrun, the deepspeed launcher); results
are read from the files the runs write.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from train_data import prepare_tiny_dataset
from train_helpers import (
    latest_tag,
    launch_train,
    plan_traces,
    read_status,
    step_losses,
    validation_records,
)

from megakv.cli.convert import main as convert_main
from megakv.train.export import consolidated_state_dict

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

STEPS = 6
# torchrun for ZeRO 1, plain env:// processes for ZeRO 2/3; the deepspeed launcher (slow to start) runs the
# resumed ZeRO-2 job, so each launcher carries a real run.
LAUNCHER = {1: "torchrun", 2: "env", 3: "env"}
# bf16 rounds differently when the gradients are summed over 2 ranks instead of over 2 more micro-batches.
BF16_REL = 1e-4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_tiny_dataset(tmp_path_factory.mktemp("train_dist_data"))


def overrides(dataset: Path, run_dir: Path, stage: int, *extra: str) -> list[str]:
    return [f"data.datasets=[{dataset}]", f"train.run_dir={run_dir}", f"parallel.zero_stage={stage}",
            f"train.steps={STEPS}", "train.debug.check_plans=true", *extra]


def assert_ok(launch, what: str) -> None:
    assert launch.ok, f"{what} failed with {launch.returncodes}:\n{launch.output[-6000:]}"


@pytest.fixture(scope="module")
def one_process(dataset, tmp_path_factory) -> Path:
    """The reference every 2-rank ZeRO stage must equal step by step: the same config on one process."""
    run_dir = tmp_path_factory.mktemp("one_process") / "run"
    assert_ok(launch_train(overrides(dataset, run_dir, 1, "validation.every=3"), nproc=1), "one-process reference")
    return run_dir


def assert_same_as_one_process(run: Path, reference: Path, rel: float) -> None:
    ours, theirs = step_losses(run), step_losses(reference)
    assert sorted(ours) == sorted(theirs) == list(range(1, STEPS + 1))
    for step in theirs:
        assert ours[step] == pytest.approx(theirs[step], rel=rel), (step, ours, theirs)
    valid_ours, valid_theirs = validation_records(run), validation_records(reference)
    assert [r["step"] for r in valid_ours] == [r["step"] for r in valid_theirs]
    for a, b in zip(valid_ours, valid_theirs):
        for key in ("valid/loss_every1", "valid/loss_every2", "valid/loss_every4"):
            assert a[key] == pytest.approx(b[key], rel=rel), (a["step"], key)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    _, weights, _ = consolidated_state_dict(run_dir)
    return weights


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_trains_routes_consistently_and_resumes_bit_exactly(dataset, one_process, tmp_path, stage):
    # --- N steps straight on 2 ranks: the one-process run's losses, validation and weights; every rank used
    # rank 0's plans; validation at 4 retention levels (6 Adam steps: weights within 1e-5 of the reference)
    straight = tmp_path / "straight"
    run = launch_train(overrides(dataset, straight, stage, "validation.every=3"), launcher=LAUNCHER[stage])
    assert_ok(run, "straight run")
    assert read_status(straight)["state"] == "finished"
    reference = step_losses(straight)
    assert reference[STEPS] < reference[1] - 0.3, reference
    assert_same_as_one_process(straight, one_process, rel=1e-6)
    single = final_weights(one_process)
    for name, weight in final_weights(straight).items():
        assert torch.allclose(weight, single[name], rtol=0, atol=1e-5), (name, (weight - single[name]).abs().max())
    traces = plan_traces(straight)
    assert sorted(traces) == [0, 1] and traces[0] == traces[1] and len(traces[0]) == STEPS
    routed = [line for line in traces[0] if any(int(s) != i for i, s in enumerate(line.split()[1:]))]
    assert routed, "R-CLA routing never routed a layer"
    valid = validation_records(straight)
    assert [r["step"] for r in valid] == [3, 6]
    assert {"valid/loss_every1", "valid/loss_every2", "valid/loss_every3", "valid/loss_every4"} <= set(valid[-1])
    assert any((straight / "tensorboard").iterdir())
    assert {"ds_config.json", "config.yaml", "checkpoints", "logs", "tokenizer"} <= {p.name for p in straight.iterdir()}

    # --- interrupted run: SIGTERM (stages 1, 2) or SIGKILL while saving (stage 3), then --resume auto
    interrupted = tmp_path / "interrupted"
    if stage == 3:
        crash = launch_train(overrides(dataset, interrupted, stage, "checkpoint.every=2",
                                       "train.debug.sigkill_while_saving_step=4"), launcher=LAUNCHER[stage])
        assert not crash.ok
        ckpts = interrupted / "checkpoints"
        assert latest_tag(interrupted) == "step_00000002"  # the previous checkpoint is still the latest ...
        assert (ckpts / "step_00000002" / "megakv_state.json").is_file()  # ... and complete
        assert (ckpts / ".tmp-step_00000004").is_dir() and not (ckpts / "step_00000004").exists()
        resumed_after = 2
    else:
        stop = launch_train(overrides(dataset, interrupted, stage, f"train.debug.sigterm_at_step={STEPS // 2}"),
                            launcher=LAUNCHER[stage])
        assert_ok(stop, "SIGTERM run")  # a clean exit (code 0) ...
        status = read_status(interrupted)
        assert status["state"] == "preempted" and status["signal"] == "SIGTERM" and status["step"] == STEPS // 2
        assert latest_tag(interrupted) == f"step_{STEPS // 2:08d}"  # ... with a resumable checkpoint
        resumed_after = STEPS // 2
    if stage == 2:
        shutil.copytree(interrupted, tmp_path / "for_universal")
    keep = ["checkpoint.every=2", "checkpoint.keep_last=2"] if stage == 3 else []
    resumed = launch_train(overrides(dataset, interrupted, stage, *keep), resume=True,
                           launcher="deepspeed" if stage == 2 else LAUNCHER[stage])
    assert_ok(resumed, "resumed run")
    assert read_status(interrupted)["state"] == "finished"
    assert not list((interrupted / "checkpoints").glob(".tmp-*"))  # the partial save was cleaned up
    if stage == 3:  # keep_last=2: the checkpoint the run resumed from was pruned once two newer ones existed
        assert sorted(p.name for p in (interrupted / "checkpoints").glob("step_*")) == ["step_00000004",
                                                                                       "step_00000006"]
    continued = step_losses(interrupted)
    for step in range(resumed_after + 1, STEPS + 1):
        assert continued[step] == reference[step], (step, continued[step], reference[step])  # bit for bit
    ours, theirs = final_weights(interrupted), final_weights(straight)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)

    if stage == 1:  # export: a megakv model dir (with the run's tokenizer) and a transformers dir
        assert convert_main(["from-checkpoint", str(straight), str(tmp_path / "model")]) == 0
        assert convert_main(["from-checkpoint", str(straight), str(tmp_path / "hf"), "--hf"]) == 0
        from megakv.model_dir import load_model, tokenizer_path

        model = load_model(tmp_path / "model")
        assert tokenizer_path(tmp_path / "model") is not None
        assert all(torch.equal(model.state_dict()[k], v) for k, v in theirs.items())
        assert (tmp_path / "hf" / "config.json").is_file()
        from megakv.data.tokenizer import load_tokenizer

        eos = load_tokenizer(straight / "tokenizer").eos_id  # generate() of the export stops at end of sequence
        for name in ("config.json", "generation_config.json"):
            assert json.loads((tmp_path / "hf" / name).read_text())["eos_token_id"] == eos, name
        # Inference tools take the run directory itself as --model, with the same weights and tokenizer.
        from megakv.model_paths import resolve_model

        from_run, run_tokenizer = resolve_model(straight)
        assert run_tokenizer == straight / "tokenizer"
        assert all(torch.equal(from_run.state_dict()[k], v) for k, v in theirs.items())

    if stage == 2:  # 2 ranks -> 1 rank through a universal checkpoint
        moved = tmp_path / "for_universal"
        assert convert_main(["to-universal", str(moved)]) == 0
        single = launch_train(overrides(dataset, moved, stage), nproc=1, resume=True)
        assert_ok(single, "1-rank resume from the universal checkpoint")
        one_rank = step_losses(moved)
        for step in range(resumed_after + 1, STEPS + 1):
            assert abs(one_rank[step] - reference[step]) < 1e-5, (step, one_rank[step], reference[step])


def test_nonfinite_steps_are_skipped_then_the_run_stops(dataset, tmp_path):
    """One bare process (no launcher), bf16: a NaN step is skipped and counted; K in a row stop the run
    (exit code 3) keeping the last good checkpoint; resuming it on other data is refused (exit code 2)."""
    run_dir = tmp_path / "nan"
    run = launch_train(overrides(dataset, run_dir, 2, "train.steps=8", "train.precision=bf16",
                                 "train.debug.nonfinite_loss_at=[2,4,5,6]", "train.max_nonfinite_steps=3",
                                 "checkpoint.every=1", "train.debug.check_plans=false"), nproc=1)
    assert run.returncodes == [3], run.output[-4000:]
    status = read_status(run_dir)
    assert status["state"] == "diverged" and status["step"] == 6 and status["skipped_steps"] == 4
    assert latest_tag(run_dir) == "step_00000003"  # the last healthy step's checkpoint is kept
    losses = step_losses(run_dir)
    assert losses[1] == losses[1] and losses[3] == losses[3]  # finite
    assert all(losses[s] != losses[s] for s in (2, 4, 5, 6))  # NaN
    weights = final_weights(run_dir)
    assert all(torch.isfinite(w).all() for w in weights.values())
    # Resuming that run directory on other data settings is refused before training, with the field named.
    other = launch_train(overrides(dataset, run_dir, 2, "train.steps=8", "data.seed=99"), nproc=1, resume=True)
    assert other.returncodes == [2] and "data.seed" in other.output and "other data" in other.output
    assert latest_tag(run_dir) == "step_00000003"


def test_resume_refuses_changed_data_contents(dataset, tmp_path):
    """Same data settings, different file contents: the data fingerprint refuses the resume (exit code 2)."""
    from train_data import synthetic_text

    from megakv.data.preprocess import preprocess

    root = tmp_path / "copy"
    shutil.copytree(dataset.parents[1], root)
    prefix = root / dataset.relative_to(dataset.parents[1])
    run_dir = tmp_path / "run"
    first = launch_train(overrides(prefix, run_dir, 2, "train.steps=2", "checkpoint.every=1",
                                   "train.debug.check_plans=false"), nproc=1)
    assert_ok(first, "run on the original data")
    changed = root / "changed.jsonl"
    changed.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_text(seed=7)))
    preprocess([str(changed)], prefix.parent / "tokenizer", prefix, workers=1, progress=False, overwrite=True)
    again = launch_train(overrides(prefix, run_dir, 2, "train.steps=4", "train.debug.check_plans=false"), nproc=1,
                         resume=True)
    assert again.returncodes == [2] and "fingerprint" in again.output and "data.datasets" in again.output
    assert f"megakv-convert from-checkpoint {run_dir}" in again.output  # how to keep the weights
    assert latest_tag(run_dir) == "step_00000002"


def test_bf16_two_ranks_train_and_resume_bit_exactly(dataset, tmp_path):
    """bf16 on 2 ranks (ZeRO-1): loss falls, plans agree, and a stop + --resume auto continues bit for bit."""
    straight, interrupted = tmp_path / "bf16", tmp_path / "bf16_resumed"
    bf16 = ["train.precision=bf16"]
    run = launch_train(overrides(dataset, straight, 1, *bf16))
    assert_ok(run, "bf16 run")
    reference = step_losses(straight)
    assert reference[STEPS] < reference[1] - 0.3, reference
    one = launch_train(overrides(dataset, tmp_path / "bf16_one", 1, *bf16), nproc=1)
    assert_ok(one, "bf16 one-process run")
    assert_same_as_one_process(straight, tmp_path / "bf16_one", rel=BF16_REL)
    traces = plan_traces(straight)
    assert traces[0] == traces[1]
    assert "bf16" in (straight / "ds_config.json").read_text()
    stop = launch_train(overrides(dataset, interrupted, 1, *bf16, f"train.debug.sigterm_at_step={STEPS // 2}"))
    assert_ok(stop, "bf16 SIGTERM run")
    resumed = launch_train(overrides(dataset, interrupted, 1, *bf16), resume=True)
    assert_ok(resumed, "bf16 resumed run")
    continued = step_losses(interrupted)
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert continued[step] == reference[step], (step, continued[step], reference[step])
    assert all(torch.isfinite(w).all() and w.dtype == torch.float32 for w in final_weights(interrupted).values())


def test_bf16_sums_micro_batch_gradients_in_fp32_and_resumes_exactly(dataset, tmp_path):
    """bf16 at ZeRO-2/3 summed the micro-batches' gradients in bf16 (DeepSpeed's default: 0.3% off at 8
    micro-batches, 1% at 128; audit). megakv asks for fp32 accumulation: DeepSpeed's optimizer holds it at
    both stages, and a ZeRO-2 run of 8 micro-batches a step stops, resumes bit for bit and exports fp32."""
    import subprocess
    import sys

    from train_helpers import REPO, TINY_RECIPE, free_port

    probe = f"""
import os, torch, deepspeed
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="{free_port()}")
from megakv.config import load_config
from megakv.parallel.wrap import build_model
from megakv.train.ds_config import build_ds_config
deepspeed.init_distributed("gloo")
for stage in (2, 3):
    cfg = load_config("{TINY_RECIPE}", ["data.datasets=[{dataset}]", "train.precision=bf16", "train.micro_batch=1",
                                      f"parallel.zero_stage={{stage}}"])
    model = build_model(cfg.model, 0)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=build_ds_config(cfg, 1))
    separate = getattr(engine.optimizer, "use_separate_grad_accum", "n/a")  # ZeRO-2: fp32 buffers beside bf16
    print("ACCUMULATES", stage, engine.optimizer.gradient_accumulation_dtype, separate)
"""
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    for stage in (2, 3):
        assert f"ACCUMULATES {stage} torch.float32" in out.stdout, out.stdout[-2000:] + out.stderr[-3000:]
    assert "ACCUMULATES 2 torch.float32 True" in out.stdout
    # (What this shows is DeepSpeed's optimizer set up to sum in fp32, not the sums' error itself: a step's
    # grad norm is dominated by the bf16 forward and cannot tell the two apart at this size.)

    bf16 = ["train.precision=bf16", "train.global_batch=8", "train.micro_batch=1", "train.debug.check_plans=false"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert_ok(launch_train(overrides(dataset, straight, 2, *bf16), nproc=1), "bf16 run")
    assert_ok(launch_train(overrides(dataset, stopped, 2, *bf16, "train.debug.sigterm_at_step=3"), nproc=1),
              "bf16 stopped run")
    assert_ok(launch_train(overrides(dataset, stopped, 2, *bf16), nproc=1, resume=True), "bf16 resumed run")
    assert step_losses(stopped) == step_losses(straight)
    assert all(torch.isfinite(w).all() and w.dtype == torch.float32 for w in final_weights(stopped).values())


def test_zero3_and_offload_match_zero1_and_resume_exactly_when_routing_leaves_projections_unused(dataset, tmp_path):
    """Under R-CLA a layer whose K/V no other layer reads gets no gradient. DeepSpeed's ZeRO-3 kept such a
    parameter's previous gradient in its flat buffer and applied it again (loss 4.309 against 4.263 after 10
    steps here, and a resume that lost the stale gradient diverged from the straight run); ZeRO-1 counts it
    as zero. One process each: the step-by-step losses agree, and a stopped ZeRO-3 run continues exactly."""
    def run(name: str, stage: int, *extra: str):
        run_dir = tmp_path / name
        done = launch_train([*overrides(dataset, run_dir, stage, "routing.q_cross=0.75", "train.steps=5",
                                        "train.debug.check_plans=false"), *extra], nproc=1)
        assert_ok(done, name)
        return run_dir

    zero1 = step_losses(run("zero1", 1))
    for name, stage, *extra in (("zero3", 3), ("zero1-offload", 1, "parallel.offload_optimizer=cpu"),
                                ("zero3-offload", 3, "parallel.offload_optimizer=cpu")):
        other = step_losses(run(name, stage, *extra))  # offload keeps its own CPU gradient copies: the same bug
        for step in range(1, 6):
            assert abs(other[step] - zero1[step]) < 1e-6, (name, step, other[step], zero1[step])
    zero3 = step_losses(tmp_path / "zero3")
    stopped = run("stopped", 3, "train.debug.sigterm_at_step=2")
    resumed = launch_train(overrides(dataset, stopped, 3, "routing.q_cross=0.75", "train.steps=5",
                                     "train.debug.check_plans=false"), nproc=1, resume=True)
    assert_ok(resumed, "resumed ZeRO-3 run")
    continued = step_losses(stopped)
    assert all(continued[step] == zero3[step] for step in range(3, 6)), (continued, zero3)


def test_another_zero_stage_resumes_through_a_universal_checkpoint(dataset, tmp_path):
    """ZeRO-2 -> ZeRO-1 (e.g. onto a pipeline, which needs stage 1) goes through `megakv-convert to-universal`
    like another layout and continues as the straight run does; stage 3 cannot move, and its conversion is
    refused before anything is written."""
    common = ["routing.q_cross=0.75", "train.steps=5", "train.debug.check_plans=false"]
    straight = tmp_path / "straight"
    assert_ok(launch_train(overrides(dataset, straight, 1, *common), nproc=1), "straight ZeRO-1 run")
    moved = tmp_path / "moved"
    assert_ok(launch_train(overrides(dataset, moved, 2, *common, "train.debug.sigterm_at_step=2"), nproc=1), "stop")
    refused = launch_train(overrides(dataset, moved, 1, *common), nproc=1, resume=True)
    assert refused.returncodes == [2] and "at ZeRO stage 2" in refused.output and "to-universal" in refused.output
    to_three = launch_train(overrides(dataset, moved, 3, *common), nproc=1, resume=True)
    assert to_three.returncodes == [2] and "to or from stage 3" in to_three.output
    assert convert_main(["to-universal", str(moved)]) == 0
    assert_ok(launch_train(overrides(dataset, moved, 1, *common), nproc=1, resume=True), "ZeRO-1 resume")
    reference, continued = step_losses(straight), step_losses(moved)
    for step in range(3, 6):
        assert abs(continued[step] - reference[step]) < 1e-5, (step, continued[step], reference[step])

    zero3 = tmp_path / "zero3"
    assert_ok(launch_train(overrides(dataset, zero3, 3, *common, "train.debug.sigterm_at_step=2"), nproc=1), "z3")
    # DeepSpeed 0.19 loads a ZeRO-3 optimizer state into another layout with a wrong Adam step count and weight
    # decay, so no launch may resume from a ZeRO-3 conversion: converting one is refused, writing nothing.
    assert convert_main(["to-universal", str(zero3)]) == 2
    assert not (zero3 / "checkpoints" / "latest_universal").exists()
    assert not list((zero3 / "checkpoints").glob("*universal*")) and not list((zero3 / "checkpoints").glob(".tmp-*"))
