"""megakv/study/runs.py: a cached run is reused only with the settings it was trained with, and a cached
score only for the model it scored."""

from __future__ import annotations

import os

import pytest

from megakv.config import load_config
from megakv.study.runs import model_fingerprint, settings_changes


def _saved_run(run_dir, text: str):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(text)
    return run_dir


SAVED = """routing:
  strategy: rcla
  max_distance: null
  per_micro_batch: true
optim:
  lr: 0.0003
data:
  datasets:
  - data/train_256
"""


def test_no_run_yet_means_no_changes(tmp_path):
    assert settings_changes(tmp_path / "absent", ["optim.lr=1"]) == []


def test_same_settings_in_another_spelling_are_not_changes(tmp_path, monkeypatch):
    run = _saved_run(tmp_path / "run", SAVED)
    monkeypatch.chdir(tmp_path)
    asked = ["routing.strategy=rcla", "routing.max_distance=null", "routing.per_micro_batch=true",
             "optim.lr=3e-4", f"data.datasets=[{tmp_path}/data/train_256]"]  # absolute path, same file
    assert settings_changes(run, asked) == []


def test_each_changed_setting_is_named_with_both_values(tmp_path):
    run = _saved_run(tmp_path / "run", SAVED)
    asked = ["routing.max_distance=1", "optim.lr=3e-4", "data.datasets=[data/train_512]", "train.steps=48"]
    assert settings_changes(run, asked) == ["routing.max_distance: None -> 1",
                                            "data.datasets: ['data/train_256'] -> ['data/train_512']",
                                            "train.steps: None -> 48"]


def test_fingerprint_follows_the_saved_model(tmp_path):
    model = _saved_run(tmp_path / "model", SAVED)
    (model / "model.safetensors").write_bytes(b"x" * 8)
    first = model_fingerprint(model)
    assert model_fingerprint(model) == first
    (model / "model.safetensors").write_bytes(b"y" * 9)  # written again
    assert model_fingerprint(model) != first
    second = model_fingerprint(model)
    os.utime(model / "model.safetensors", ns=(1, 1))
    assert model_fingerprint(model) != second
    (model / "status.json").write_text('{"state": "finished", "step": 4}')
    assert model_fingerprint(model) != model_fingerprint(tmp_path / "model-copy-missing")


def test_a_key_given_twice_is_judged_by_its_last_value(tmp_path):
    """megakv-train applies overrides in order (the last one wins), so only the last value can differ."""
    assert load_config(None, ["optim.lr=1e-3", "optim.lr=3e-4"]).optim.lr == 3e-4
    run = _saved_run(tmp_path / "run", SAVED)
    assert settings_changes(run, ["optim.lr=1e-3", "optim.lr=3e-4"]) == []
    assert settings_changes(run, ["optim.lr=3e-4", "optim.lr=1e-3"]) == ["optim.lr: 0.0003 -> 0.001"]


def test_a_setting_that_comes_from_the_recipe_is_compared_too(tmp_path):
    """The study passes a recipe plus overrides: a value the recipe supplies (weight decay, seeds, the q_cross
    ramp left at its default) must match the saved run as well, or the cached model is not reused."""
    from megakv.config import save_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  weight_decay: 0.1\nrouting:\n  seed: 1234\n  q_cross_warmup_steps: 8\n"
                      "logging:\n  log_every: 5\n")
    asked = ["optim.lr=3e-4", "data.datasets=[data/train_256]"]
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(recipe, asked), run / "config.yaml")  # what megakv-train saved for that run
    assert settings_changes(run, asked, recipe) == []
    recipe.write_text("optim:\n  weight_decay: 0.0\nrouting:\n  seed: 1234\nlogging:\n  log_every: 50\n")
    assert sorted(settings_changes(run, asked, recipe)) == ["optim.weight_decay: 0.1 -> 0.0",
                                                            "routing.q_cross_warmup_steps: 8 -> 0"]  # not logging


def test_a_run_retrained_in_place_with_the_same_settings_has_another_fingerprint(tmp_path):
    """Same config.yaml, status.json and `latest` tag: only the checkpoint's manifest (run id, file digests)
    tells the models apart, so a cached QA score of the old one is not reused for the new one."""
    run = _saved_run(tmp_path / "run", SAVED)
    (run / "status.json").write_text('{"state": "finished", "step": 4}')
    tag = run / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000004")
    (tag / "megakv_state.json").write_text('{"run_id": "first", "files": {"a.pt": [8, "aaaa"]}}')
    first = model_fingerprint(run)
    (tag / "megakv_state.json").write_text('{"run_id": "second", "files": {"a.pt": [8, "bbbb"]}}')
    assert model_fingerprint(run) != first


def _reprepare(prefix, docs: list[str]) -> None:
    """Prepare `docs` again under `prefix` (its tokenizer kept), as a user re-running megakv-prep would."""
    import json

    from megakv.data.preprocess import preprocess

    corpus = prefix.parent.parent / "other.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess([str(corpus)], prefix.parent / "tokenizer", prefix, overwrite=True, progress=False)


def test_a_cached_run_is_not_reused_on_data_prepared_again_under_the_same_name(tmp_path, monkeypatch):
    """The study compared settings only: data prepared again under the same prefix (or a rebuilt base model)
    reused the models and scores of the old one, with every setting unchanged (audit: 'cached', the same
    losses). Each run's inputs are recorded by content and checked on reuse."""
    import pytest

    from megakv.config import save_config
    from megakv.study.runs import train_run
    from megakv.testing.tiny_data import prepare_tiny_dataset, synthetic_text

    prefix = prepare_tiny_dataset(tmp_path / "d")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  lr: 0.001\n")
    asked = [f"data.datasets=[{prefix}]"]
    run = tmp_path / "runs" / "q0"
    run.mkdir(parents=True)
    save_config(load_config(recipe, asked), run / "config.yaml")
    (run / "status.json").write_text('{"state": "finished", "step": 4}')
    logged = []
    assert train_run(recipe, run, asked, log=logged.append) == 0.0  # cached: the record starts here
    assert train_run(recipe, run, asked, log=logged.append) == 0.0  # the same data: cached again
    assert logged == [f"cached: {run}"] * 2
    monkeypatch.chdir(tmp_path)  # the same files named relative to the working directory (--out study vs $PWD/study)
    relative = [f"data.datasets=[{prefix.relative_to(tmp_path)}]"]
    save_config(load_config(recipe, relative), run / "config.yaml")
    assert train_run(recipe, run, relative, log=logged.append) == 0.0
    _reprepare(prefix, synthetic_text()[::-1][:40])
    with pytest.raises(ValueError, match=rf"trained on other inputs than these \(data {prefix} changed"):
        train_run(recipe, run, asked, log=logged.append)


def test_a_cached_retention_loss_is_not_reused_on_data_prepared_again(tmp_path):
    import torch

    from megakv.config import ModelConfig
    from megakv.model import MegaKVModel
    from megakv.model_dir import save_model_dir
    from megakv.study.runs import retention_losses
    from megakv.testing.tiny_data import prepare_tiny_dataset, synthetic_text

    prefix = prepare_tiny_dataset(tmp_path / "d")
    cfg = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)
    torch.manual_seed(0)
    model = save_model_dir(cfg, MegaKVModel(cfg, init_seed=3).state_dict(), tmp_path / "model",
                           tokenizer_dir=prefix.parent / "tokenizer")
    first = retention_losses(model, prefix, ["every:1"], max_tokens=256, log=print)
    assert retention_losses(model, prefix, ["every:1"], max_tokens=256, log=print) == first
    # A cache written before keys held the data's content is taken over, not scored again.
    import json

    cache = model / "retention_losses.json"
    (key, losses), = json.loads(cache.read_text()).items()
    old_key = f"{prefix.resolve()}|256|None"
    cache.write_text(json.dumps({old_key: {"every:1": 1.25}}))
    scored = []
    assert retention_losses(model, prefix, ["every:1"], max_tokens=256, log=scored.append) == {"every:1": 1.25}
    assert scored == [] and json.loads(cache.read_text()) == {key: {"every:1": 1.25}}
    cache.write_text(json.dumps({key: losses}))
    _reprepare(prefix, synthetic_text()[::-1][:40])
    assert retention_losses(model, prefix, ["every:1"], max_tokens=256, log=print) != first


# ------------------------------------------------------------------ stopping the study (real processes, signals)

SLOW_STUDY = '''"""megakv-study pretrain --scale tiny, its trainings slowed (more steps, a floor per step)."""
import sys
from dataclasses import replace

from megakv.cli.study import main
from megakv.study import scratch

steps, min_step_s = int(sys.argv[2]), float(sys.argv[3])
scratch.SCALES["tiny"] = replace(scratch.SCALES["tiny"], steps=steps, seed_repeats=0)
overrides = scratch.ScratchRun.overrides
scratch.ScratchRun.overrides = lambda self, *a: [*overrides(self, *a), f"train.debug.min_step_s={min_step_s}"]
sys.exit(main(["pretrain", "--scale", "tiny", "--out", sys.argv[1]]))
'''


def _slow_study(tmp_path, out, steps=40, min_step_s=0.25, **popen):
    """The study command (pretrain, tiny) in a process of its own, its trainings slowed so a signal lands
    mid-training; the worktree's megakv, for it and for the trainings it starts."""
    import subprocess
    import sys
    from pathlib import Path

    import megakv

    driver = tmp_path / "slow_study.py"
    driver.write_text(SLOW_STUDY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(megakv.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, str(driver), str(out), str(steps), str(min_step_s)], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _state(run_dir):
    import json

    path = run_dir / "status.json"
    try:
        return json.loads(path.read_text())["state"] if path.is_file() else None
    except ValueError:  # being replaced this instant
        return None


def _wait_until(condition, timeout_s: float, what: str):
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def _training_mid_run(run_dir, steps_seen: int = 2):
    """The run is training (its signal handler installed) and has logged past `steps_seen` steps this time."""
    metrics = run_dir / "metrics.jsonl"
    start = len(metrics.read_text().splitlines()) if metrics.is_file() else 0
    return lambda: (_state(run_dir) == "running" and metrics.is_file()
                    and len(metrics.read_text().splitlines()) >= start + steps_seen)


def _children(pid: int) -> list[int]:
    from pathlib import Path

    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    from pathlib import Path

    try:  # a zombie has ended (it only waits to be reaped)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_stopped_study_stops_its_trainings_with_a_checkpoint_and_a_rerun_resumes(tmp_path):
    """Audit: SIGTERM or SIGKILL to megakv-study left its megakv-train children training on as orphans (to the
    end, holding the run's lock, and dying without a checkpoint on a later SIGTERM: their stdout pipe was gone),
    and the rerun failed on the lock. Now SIGTERM is passed on (the trainings save, the study exits 143 saying a
    rerun resumes), a SIGKILLed study's trainings get SIGTERM from the kernel (PR_SET_PDEATHSIG) and save, and
    Ctrl-C to the whole process group still stops everything with checkpoints, without a traceback."""
    import json
    import signal
    import sys

    import pytest

    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG and /proc are Linux's")
    out = tmp_path / "out"
    runs = out / "pretrain" / "runs"
    first = ("q0", "q0.5")  # the deep models train first, two at once

    # Ctrl-C in the terminal: SIGINT to the study and its trainings at once
    study = _slow_study(tmp_path, out, start_new_session=True)
    _wait_until(_training_mid_run(runs / "q0"), 180, "q0 to train")
    os.killpg(study.pid, signal.SIGINT)
    _, stderr = study.communicate(timeout=120)
    assert study.returncode == 130, stderr
    assert "Rerun the same command to resume" in stderr and "Traceback" not in stderr
    assert [_state(runs / name) for name in first] == ["preempted", "preempted"]

    # SIGTERM to the study alone (kill PID): passed on to its trainings, which save a checkpoint and exit
    study = _slow_study(tmp_path, out)
    _wait_until(_training_mid_run(runs / "q0"), 180, "q0 to resume")
    trainings = _children(study.pid)
    assert len(trainings) == 2
    study.send_signal(signal.SIGTERM)
    _, stderr = study.communicate(timeout=120)
    assert study.returncode == 143, stderr
    assert "stopped by SIGTERM" in stderr and "Rerun the same command to resume" in stderr
    assert not any(_alive(pid) for pid in trainings)
    assert [_state(runs / name) for name in first] == ["preempted", "preempted"]
    assert "SIGTERM received: saving a checkpoint" in (runs / "q0_train.log").read_text()

    # SIGKILL to the study: the kernel sends its trainings SIGTERM; they save and exit instead of training on
    study = _slow_study(tmp_path, out)
    _wait_until(_training_mid_run(runs / "q0"), 180, "q0 to resume again")
    trainings = _children(study.pid)
    step_before = json.loads((runs / "q0" / "status.json").read_text())["step"]
    study.kill()
    study.communicate(timeout=60)
    _wait_until(lambda: not any(_alive(pid) for pid in trainings), 60, "the orphaned trainings to stop")
    assert [_state(runs / name) for name in first] == ["preempted", "preempted"]
    assert json.loads((runs / "q0" / "status.json").read_text())["step"] > step_before  # saved anew

    # the same command again: resumes both and finishes the part
    study = _slow_study(tmp_path, out)
    stdout, stderr = study.communicate(timeout=300)
    assert study.returncode == 0, stderr
    assert any(line.startswith("[q0] ") and "resumed from" in line for line in stdout.splitlines())
    assert all(_state(runs / name) == "finished" for name in ("q0", "q0.5", "shallow-L2", "shallow-L1"))

    # q0 trained in 4 invocations: its time adds them up (it was each invocation's own seconds, and nothing
    # for one whose study was killed); 40 steps of at least 0.25 s each, startups on top
    from megakv.study.results import PartResult
    from megakv.study.runs import trained_seconds

    record = trained_seconds(runs / "q0")
    assert record["invocations"] == 4 and record["seconds"] >= 40 * 0.25
    note = PartResult.load(out / "pretrain").notes[-1]
    assert f"q0 {record['seconds']:.0f} (4 invocations)" in note and "shallow-L1 " in note
    assert "counts the seconds of each" in note


def test_a_report_dir_that_cannot_be_a_directory_is_refused_before_anything_trains(tmp_path, capsys):
    """Audit: `--report-dir FILE` failed only after all the training, with "[Errno 17] File exists" and no word of
    --report-dir. The study command now checks it first: exit 2 naming --report-dir and the fix, nothing made."""
    from megakv.cli.study import main as study_main

    taken = tmp_path / "report.md"
    taken.write_text("not a directory")
    out = tmp_path / "out"
    for report_dir, problem in ((taken, "exists and is not a directory"),
                                (taken / "sub", "cannot be created: ")):
        assert study_main(["pretrain", "--scale", "tiny", "--out", str(out), "--report-dir", str(report_dir)]) == 2
        error = capsys.readouterr().err
        assert f"--report-dir {report_dir} {problem}" in error and "Fix: " in error
        assert not out.exists()  # nothing prepared or trained
    assert study_main(["report", "--out", str(out), "--report-dir", str(taken)]) == 2


@pytest.mark.slow
def test_a_moved_or_copied_study_reuses_its_models_and_resumes_its_interrupted_trainings(tmp_path):
    """Audit: `cp -a OUT OUT2; megakv-study PART --out OUT2` exited 2, "holds a run trained with other settings
    (data.datasets: ['.../A/...'] -> ['.../Amoved/...'])": every cached model was thrown away, since paths
    inside --out were compared as they were spelled, and the inputs record and the held-out loss cache were
    keyed by resolved paths. Now a copy reuses every model and score, and resumes an interrupted training
    (megakv-train accepts the moved data by its content)."""
    import signal
    import subprocess

    from megakv.study.results import PartResult

    first = tmp_path / "A"
    study = _slow_study(tmp_path, first, steps=20, min_step_s=0.25)
    _wait_until(_training_mid_run(first / "pretrain" / "runs" / "q0"), 180, "q0 to train")
    study.send_signal(signal.SIGTERM)
    assert study.wait(timeout=120) == 143
    assert _state(first / "pretrain" / "runs" / "q0") == "preempted"

    moved = tmp_path / "Amoved"
    subprocess.run(["cp", "-a", str(first), str(moved)], check=True)
    study = _slow_study(tmp_path, moved, steps=20, min_step_s=0.25)
    stdout, stderr = study.communicate(timeout=300)
    assert study.returncode == 0, stderr
    assert "trained with other settings" not in stderr
    q0 = [line for line in stdout.splitlines() if line.startswith("[q0] ")]
    assert any("resumed from" in line for line in q0), stdout
    assert any("at another path than in the checkpoint" in line for line in q0)  # megakv-train: same content

    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(moved), str(copy)], check=True)
    study = _slow_study(tmp_path, copy, steps=20, min_step_s=0.25)
    stdout, stderr = study.communicate(timeout=300)
    assert study.returncode == 0, stderr
    messages = [line.split("] ", 1)[1] for line in stdout.splitlines() if line.startswith("[megakv-study ")]
    assert sum(m.startswith("cached: ") for m in messages) == 4
    assert not any(m.startswith(("training ", "scoring ")) for m in messages), messages
    assert PartResult.load(copy / "pretrain").tables == PartResult.load(moved / "pretrain").tables


def test_the_cpu_scale_checkpoints_every_50_steps_and_still_reuses_runs_saved_less_often(tmp_path):
    """Audit: from-scratch models checkpointed every steps // 2 (400 of the cpu scale's 800 steps, ~5 min), so a
    crash redid up to half a model; a save of that model takes ~0.2 s, so the cpu scale now saves every 50 steps.
    A run cached by a study that saved every 400 must still be reused: checkpoint.* does not change the model,
    and an override of it was compared (so were train.debug.* overrides) unlike the same key from the recipe."""
    from megakv import recipes
    from megakv.config import save_config
    from megakv.study.scratch import ScratchRun, StudyData, scale_settings

    settings = scale_settings("cpu")
    data = StudyData(("d/train",), {"d": "d/valid"}, "d/tokenizer")
    now = ScratchRun("q0", tmp_path / "q0", "none", 0.0, 8).overrides(settings, data)
    assert "checkpoint.every=50" in now
    then = [o.replace("checkpoint.every=50", "checkpoint.every=400") for o in now]
    run = tmp_path / "q0"
    run.mkdir()
    save_config(load_config(recipes.path("demo"), then), run / "config.yaml")  # what megakv-train saved then
    assert settings_changes(run, now, recipes.path("demo")) == []
    assert settings_changes(run, [*now, "train.debug.min_step_s=0.5"], recipes.path("demo")) == []
    assert settings_changes(run, [*now, "optim.lr=1"], recipes.path("demo")) == ["optim.lr: 0.002 -> 1"]


def test_torch_threads_is_restored_after_the_work_and_after_an_error():
    """study/finetune.py set torch's thread count for its evaluations and never put it back (scratch.py did)."""
    import torch

    from megakv.study.runs import torch_threads

    before = torch.get_num_threads()
    other = 2 if before == 1 else 1
    with torch_threads(other):
        assert torch.get_num_threads() == other
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError, match="boom"), torch_threads(other):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_both_study_parts_name_their_scales_the_same_way():
    from megakv.study import finetune, scratch

    for part in (finetune, scratch):
        assert part.scale_settings("cpu") is part.SCALES["cpu"]
        with pytest.raises(ValueError, match=f"unknown study scale 'huge': choose one of {', '.join(part.SCALES)}"):
            part.scale_settings("huge")
