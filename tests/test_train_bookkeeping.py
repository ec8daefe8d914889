"""Training bookkeeping a user can trust: the logged learning rate is the one the step used, a decay
horizon apart from the run length (and a notice when a resume changes the schedule), WSD, parameter count,
step time, peak memory and MFU in the log and in TensorBoard, and document-boundary masking in training."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from train_data import prepare_tiny_dataset
from train_helpers import TINY_RECIPE, launch_train, read_metrics, step_losses

from megakv.config import ConfigError, ModelConfig, OptimConfig, load_config
from megakv.optim.schedule import lr_at, schedule_change
from megakv.train.throughput import count_parameters, flops_per_token

PEAK = 1e12


def test_decay_steps_keep_the_schedule_when_a_run_is_extended():
    cfg = OptimConfig(lr=3e-3, warmup_steps=2, decay_steps=8)
    assert [lr_at(s, cfg, 8) for s in range(12)] == [lr_at(s, cfg, 12) for s in range(12)]
    assert [lr_at(s, cfg, 12) for s in range(8, 12)] == pytest.approx([3e-4] * 4)
    plain = OptimConfig(lr=3e-3, warmup_steps=2)
    assert lr_at(8, plain, 8) == pytest.approx(3e-4) and lr_at(8, plain, 12) > 1e-3  # the horizon moved


@pytest.mark.parametrize("style,at_half", [("linear", 0.5), ("cosine", 0.5), ("minus_sqrt", 1 - math.sqrt(0.5))])
def test_wsd_is_warm_up_stable_then_decay_to_the_floor(style, at_half):
    cfg = OptimConfig(lr=1e-3, min_lr_ratio=0.1, warmup_steps=2, schedule="wsd", wsd_decay_steps=10,
                      wsd_decay_style=style)
    lrs = [lr_at(s, cfg, 30) for s in range(31)]
    assert lrs[:2] == pytest.approx([5e-4, 1e-3])
    assert lrs[2:21] == pytest.approx([1e-3] * 19)  # stable until the decay phase starts at step 20
    assert lrs[25] == pytest.approx(1e-4 + 9e-4 * at_half)
    assert lrs[30] == pytest.approx(1e-4) and all(a >= b for a, b in zip(lrs[20:], lrs[21:]))


@pytest.mark.parametrize("overrides,field", [
    (["optim.schedule=wsd"], "optim.wsd_decay_steps"),
    (["optim.schedule=wsd", "optim.wsd_decay_steps=999", "train.steps=100"], "optim.wsd_decay_steps"),
    (["optim.decay_steps=50", "optim.warmup_steps=50"], "optim.decay_steps"),
    (["optim.wsd_decay_style=exp"], "optim.wsd_decay_style"),
])
def test_schedule_settings_are_validated(overrides, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        load_config(None, overrides)


def test_a_changed_schedule_is_described_with_the_fix():
    cfg = OptimConfig(lr=3e-3, warmup_steps=2)
    notice = schedule_change(cfg, 8, cfg, 12, steps_applied=8)
    assert notice is not None and "from step 9 the rate is 1.233e-03" in notice
    assert "checkpoint's schedule gives 3.000e-04" in notice and "optim.decay_steps=8" in notice
    assert schedule_change(cfg, 8, replace(cfg, decay_steps=8), 12, steps_applied=8) is None
    assert schedule_change(cfg, 8, cfg, 8, steps_applied=4) is None


def test_eta_counts_whole_iterations_and_leaves_out_the_first():
    """The ETA was remaining steps x the mean step time: the first step's start-up inflated it and validation
    and checkpoint saves (outside the timed step) were missing from it."""
    from megakv.train.throughput import EtaClock

    clock = EtaClock(window=3)
    clock.iteration_starts(0.0)
    assert clock.seconds_left(10, step_seconds=1.0) == 10.0  # nothing whole timed yet: the step itself
    clock.iteration_starts(5.0)  # the first iteration (start-up) took 5 s: left out
    assert clock.seconds_left(10, step_seconds=0.5) == 5.0
    for now in (5.5, 6.0, 7.5):  # 0.5, 0.5, then 1.5 s: a step with a validation and a save
        clock.iteration_starts(now)
    assert clock.seconds_left(10, step_seconds=0.5) == pytest.approx(10 * (0.5 + 0.5 + 1.5) / 3)
    clock.iteration_starts(8.0)  # the window keeps the last 3: 0.5, 1.5, 0.5
    assert clock.seconds_left(4, step_seconds=0.5) == pytest.approx(4 * 2.5 / 3)


def test_flops_per_token_by_hand():
    cfg = ModelConfig(vocab_size=320, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=128, max_seq_len=64)
    per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * (64 * 128)  # q, k, v, o, gate/up/down
    matmul = 4 * per_layer + 320 * 64  # + the output projection
    params = count_parameters(cfg)
    assert params.matmul == matmul and params.embedding == 320 * 64
    assert params.total == matmul + 320 * 64 + 4 * 2 * 64 + 64  # + embedding + norms
    assert flops_per_token(cfg, params, 64) == 6 * matmul + 12 * 4 * 64 * 64


# ------------------------------------------------------------------------------------ real training runs


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_tiny_dataset(tmp_path_factory.mktemp("bookkeeping_data"))


def _run(dataset: Path, run_dir: Path, *extra: str, resume: bool = False):
    launch = launch_train([f"data.datasets=[{dataset}]", f"train.run_dir={run_dir}", "optim.lr=3e-3",
                           "optim.warmup_steps=2", *extra], nproc=1, resume=resume)
    assert launch.ok, launch.output[-5000:]
    return launch


def _lrs(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/lr"] for r in read_metrics(run_dir) if "train/lr" in r}


@pytest.mark.slow
def test_logged_rates_perf_figures_and_an_extended_run(dataset, tmp_path):
    cfg = load_config(TINY_RECIPE, ["optim.lr=3e-3", "optim.warmup_steps=2", "train.steps=8"])
    first = tmp_path / "run"
    launch = _run(dataset, first, "train.steps=8", f"logging.peak_flops_per_device={PEAK}")
    # the rate each step trained with: 1.5e-3 at step 1 (half of warm-up), the peak at step 2, ...
    assert _lrs(first) == pytest.approx({s: lr_at(s - 1, cfg.optim, 8) for s in range(1, 9)})
    params = count_parameters(cfg.model)
    assert f"model: {params.total:,} parameters" in launch.output and "MFU against 1e+12" in launch.output
    assert "| peak RSS " in launch.output and "| MFU " in launch.output
    record = read_metrics(first)[-1]
    tokens = cfg.train.global_batch * cfg.model.max_seq_len
    expected_mfu = flops_per_token(cfg.model, params, cfg.model.max_seq_len) * tokens / record[
        "perf/step_time_s"] / PEAK
    assert record["perf/mfu"] == pytest.approx(expected_mfu)
    assert 0.05 < record["perf/peak_memory_gib"] < 24
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(first / "tensorboard"))
    events.Reload()
    assert {"perf/mfu", "perf/step_time_s", "perf/peak_memory_gib", "train/lr"} <= set(events.Tags()["scalars"])
    assert events.Scalars("train/lr")[0].value == pytest.approx(1.5e-3)

    # resuming the finished run as it was: nothing to train, and the log says so (it exited 0 in silence)
    again = _run(dataset, first, "train.steps=8", f"logging.peak_flops_per_device={PEAK}", resume=True)
    assert "the run already finished: its checkpoint is at step 8 of train.steps=8" in again.output
    # extending the finished run: without a decay horizon the cosine is reshaped, and the log says so
    kept = tmp_path / "kept"
    shutil.copytree(first, kept)
    extended = _run(dataset, first, "train.steps=12", resume=True)
    assert "resuming on a different learning-rate schedule: from step 9" in extended.output
    assert "optim.decay_steps=8" in extended.output
    longer = replace(cfg.optim)
    assert _lrs(first)[9] == pytest.approx(lr_at(8, longer, 12))  # the new schedule from the first new step
    # with optim.decay_steps=8 the old decay is kept: the floor from step 9 on, and no notice
    quiet = _run(dataset, kept, "train.steps=12", "optim.decay_steps=8", resume=True)
    assert "different learning-rate schedule" not in quiet.output
    assert [_lrs(kept)[s] for s in range(9, 13)] == pytest.approx([3e-4] * 4)


@pytest.mark.slow
def test_document_masking_in_training_matches_a_masked_reference(dataset, tmp_path):
    from megakv.data.boundaries import mask_documents
    from megakv.data.loader import build_data, micro_batches
    from megakv.parallel.wrap import build_model

    def causal_lm_loss(logits, labels):
        return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())

    overrides = [f"data.datasets=[{dataset}]", "routing.strategy=none", "train.steps=2"]
    masked = ["data.reset_attention_mask=true", "data.reset_position_ids=true"]
    _run(dataset, tmp_path / "masked", *overrides[1:], *masked)
    _run(dataset, tmp_path / "plain", *overrides[1:])
    run_loss = {name: step_losses(tmp_path / name)[1] for name in ("masked", "plain")}

    cfg = load_config(TINY_RECIPE, overrides + masked)
    data = build_data(cfg.data, cfg.model.max_seq_len, is_builder=True,
                      train_samples=cfg.train.steps * cfg.train.global_batch)
    batches = micro_batches(data.train, 0, cfg.train.global_batch, cfg.train.micro_batch, 0, 1)
    assert any(bool((inputs[:, 1:] == data.eos_id).any()) for inputs, _ in batches)  # documents do meet in samples
    model = build_model(cfg.model, cfg.train.seed)  # the weights training starts from
    with torch.no_grad():
        plain = sum(float(causal_lm_loss(model(x), y)) for x, y in batches) / len(batches)
        mask_documents(model, data.eos_id, True, True)
        reference = sum(float(causal_lm_loss(model(x), y)) for x, y in batches) / len(batches)
    assert run_loss["plain"] == pytest.approx(plain, abs=1e-5)
    assert run_loss["masked"] == pytest.approx(reference, abs=1e-5)
    assert abs(reference - plain) > 20 * 1e-5  # an untrained model: small, but far beyond the tolerance


def test_a_metrics_line_cut_mid_character_is_dropped_on_resume(tmp_path):
    """A crash can cut metrics.jsonl inside a multi-byte character: the resume was a UnicodeDecodeError
    traceback. Such a line is dropped like any other cut line; the steps up to the checkpoint are kept."""
    from megakv.train.metrics import drop_records_after

    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "note": "ü"}, ensure_ascii=False) for s in (1, 2, 3)]
    path.write_bytes(("\n".join(lines) + "\n").encode() + lines[2].encode()[:-3])  # ends inside "ü"
    assert drop_records_after(path, 2) == 2  # step 3, and the cut line
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


@pytest.mark.slow
def test_tensorboard_shows_each_step_once_after_a_resume(dataset, tmp_path):
    """A run that went past its last checkpoint and resumed: metrics.jsonl drops the abandoned steps, and
    TensorBoard hid nothing (it showed steps 1..5 then 4, 5 again, the abandoned step 5 among them)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _run(dataset, run, "train.steps=5", "checkpoint.every=3", "checkpoint.save_final=false")
    _run(dataset, run, "train.steps=5", "checkpoint.every=3", "optim.lr=1e-3", resume=True)  # steps 4, 5 redone
    losses = step_losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    shown = events.Scalars("train/loss")
    assert [e.step for e in shown] == [1, 2, 3, 4, 5]
    assert [e.value for e in shown] == pytest.approx([losses[s] for s in range(1, 6)], rel=1e-6)
