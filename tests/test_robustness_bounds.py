"""Bounds and changed settings: non-finite optimizer settings and impossible micro-batches are refused at
launch; a resume with settings that change what the run computes is refused unless --allow-config-change
(every change is logged); a second SIGTERM/SIGINT aborts at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from checkpoint_helpers import one_process, shared_runs, tiny_config
from train_helpers import REPO, TINY_RECIPE, _child_env, launch_train, read_status

from megakv.config import ConfigError, load_config
from megakv.train.preflight import preflight


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


@pytest.mark.parametrize("override,field", [("optim.lr=inf", "optim.lr"), ("optim.lr=nan", "optim.lr"),
                                            ("optim.grad_clip=inf", "optim.grad_clip"),
                                            ("parallel.timeout=0", "parallel.timeout"),
                                            ("parallel.timeout=inf", "parallel.timeout")])
def test_non_finite_or_empty_bounds_are_refused(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(TINY_RECIPE, [override])
    assert info.value.field == field and "Fix:" in str(info.value)


def test_a_micro_batch_that_cannot_fit_is_refused_and_a_risky_one_warned(runs, tmp_path):
    with pytest.raises(ConfigError) as info:
        preflight(tiny_config(runs, tmp_path / "a", "model.max_seq_len=2000000"), one_process())
    assert info.value.field == "model.max_seq_len" and "GiB" in info.value.problem
    assert "train.micro_batch" in info.value.fix
    with pytest.warns(UserWarning, match="100000x100000 scores"):
        preflight(tiny_config(runs, tmp_path / "b", "model.max_seq_len=100000"), one_process())


@pytest.mark.parametrize("override", ["routing.q_cross=0.7", "routing.strategy=none", "routing.seed=7",
                                      "train.global_batch=16", "data.reset_attention_mask=true",
                                      "data.reset_position_ids=true"])
def test_resume_refuses_settings_that_change_what_the_run_computes(runs, tmp_path, override):
    run_dir = runs.copy_stopped(tmp_path / "run")
    field = override.split("=")[0]
    with pytest.raises(ConfigError) as info:
        preflight(tiny_config(runs, run_dir, "checkpoint.resume=auto", override), one_process())
    assert info.value.field == field and "--allow-config-change" in info.value.fix
    allowed = preflight(tiny_config(runs, run_dir, "checkpoint.resume=auto", "checkpoint.allow_config_change=true",
                                    override), one_process())
    assert any(c.startswith(f"{field}:") and "allowed" in c for c in allowed.resume.config_changes)



def test_resume_accepts_the_same_data_settings_spelled_otherwise():
    """The default tokenizer written out, or weights scaled alike, read the same samples in the same order
    (the data fingerprint is equal): refusing them sent users to start over for nothing."""
    from megakv.config import to_yaml
    from megakv.train.preflight import check_same_data
    from megakv.train.state import TrainState

    saved = TrainState(step=2, config_yaml=to_yaml(load_config(TINY_RECIPE, ["data.datasets=[d/a,d/b]",
                                                                             "data.weights=[1,1]"])))

    def check(*now: str) -> None:
        check_same_data(load_config(TINY_RECIPE, ["data.datasets=[d/a,d/b]", *now]), saved, Path("ckpt"))

    check("data.weights=[1,1]")
    check("data.weights=[2.5,2.5]", "data.tokenizer=d/tokenizer")
    for others, field in [(["data.weights=[1,2]"], "data.weights"), (["data.weights=null"], "data.weights")]:
        with pytest.raises(ConfigError) as info:
            check(*others)
        assert info.value.field == field
    # paths: the same files may have moved; the data fingerprint (content) decides when the data is opened
    with pytest.warns(UserWarning, match="data.tokenizer is at another path"):
        check("data.weights=[1,1]", "data.tokenizer=elsewhere/tokenizer")
    with pytest.raises(ConfigError) as info:  # another number of datasets is another blend whatever the content
        check_same_data(load_config(TINY_RECIPE, ["data.datasets=[d/a]"]), saved, Path("ckpt"))
    assert info.value.field == "data.datasets"


def test_resume_after_the_data_moved_continues_and_other_data_is_still_refused(runs, tmp_path):
    """The data copied to another filesystem (and the old copy gone): resume was refused however equal the
    content (filesystem audit). It now continues exactly; other data at the new path is still refused, by the
    data's content fingerprint."""
    import shutil

    from checkpoint_helpers import STOP_AT
    from train_helpers import step_losses

    run_dir = runs.copy_stopped(tmp_path / "run")
    moved = tmp_path / "moved"
    shutil.copytree(runs.dataset.parent, moved)
    resumed = launch_train([*runs.overrides(run_dir), f"data.datasets=[{moved / runs.dataset.name}]"], nproc=1,
                           resume=True)
    assert resumed.ok and "data.datasets is at another path" in resumed.output, resumed.output[-3000:]
    losses, reference = step_losses(run_dir), step_losses(runs.reference)
    assert all(losses[s] == reference[s] for s in range(STOP_AT + 1, max(reference) + 1))
    from megakv.data.preprocess import preprocess

    lines = (runs.dataset.parent.parent / "corpus.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "reordered.jsonl").write_text("".join(reversed(lines)))  # the same tokenizer, another order
    preprocess([str(tmp_path / "reordered.jsonl")], runs.dataset.parent / "tokenizer", tmp_path / "other" / "train",
               progress=False)
    refused = launch_train([*runs.overrides(runs.copy_stopped(tmp_path / "run2")),
                            f"data.datasets=[{tmp_path / 'other' / 'train'}]"], nproc=1, resume=True)
    assert refused.returncodes == [2] and "data fingerprint" in refused.output, refused.output[-3000:]


def test_another_micro_batch_changes_the_run_only_with_a_plan_per_micro_batch():
    """With routing.per_micro_batch a step draws global_batch / micro_batch plans: another micro-batch size drew
    other plans from the resumed step on (losses off by 9.7e-4 two steps later) with only a log line."""
    from megakv.config import to_yaml
    from megakv.train.preflight import check_config_changes
    from megakv.train.state import TrainState

    def changes(saved: list[str], now: list[str], allow: bool = False) -> list[str]:
        state = TrainState(step=2, config_yaml=to_yaml(load_config(TINY_RECIPE, saved)))
        return check_config_changes(load_config(TINY_RECIPE, now), state, Path("ckpt"), allow)

    per_micro_batch = ["routing.per_micro_batch=true"]
    with pytest.raises(ConfigError) as info:
        changes(per_micro_batch, [*per_micro_batch, "train.micro_batch=1"])
    assert info.value.field == "train.micro_batch" and "--allow-config-change" in info.value.fix
    assert changes(per_micro_batch, [*per_micro_batch, "train.micro_batch=1"], allow=True) == [
        "train.micro_batch: 2 -> 1 (allowed by --allow-config-change)"]
    # one plan per step: the micro-batch size changes only how the step is accumulated
    assert changes([], ["train.micro_batch=1"]) == ["train.micro_batch: 2 -> 1"]


def test_resume_refuses_another_sample_length(runs, tmp_path):
    """data.seq_len decides the sample order: refused before any process group, naming the field (it used to
    pass preflight and fail later as a data fingerprint blaming data.datasets)."""
    run_dir = runs.copy_stopped(tmp_path / "run")
    saved = tiny_config(runs, run_dir, "checkpoint.resume=auto").seq_len
    with pytest.raises(ConfigError) as info:
        preflight(tiny_config(runs, run_dir, "checkpoint.resume=auto", f"data.seq_len={saved // 2}"), one_process())
    assert info.value.field == "data.seq_len" and f"{saved}-token samples" in info.value.problem
    assert f"data.seq_len={saved}" in info.value.fix
    preflight(tiny_config(runs, run_dir, "checkpoint.resume=auto", f"data.seq_len={saved}"), one_process())



def test_launch_mistakes_are_named_before_any_process_group(runs, tmp_path):
    """Each used to pass --dry-run and then crash with a traceback (exit 1), log NaN, or do nothing."""
    def refused(field, fn, *args):
        with pytest.raises(ConfigError) as info:
            fn(*args)
        assert info.value.field == field and "Fix:" in str(info.value), str(info.value)
        return info.value

    refused("routing.seed", tiny_config, runs, tmp_path / "a", "routing.seed=-1")  # crashed at step 1
    assert "train.steps=[1" in str(refused("<override>", tiny_config, runs, tmp_path / "a", "train.steps=[1"))
    no_validation_data = refused("validation.every", tiny_config, runs, tmp_path / "a", "data.valid_fraction=0",
                                 "validation.every=2")  # validated on nothing: NaN losses, exit 0
    assert "data.valid_datasets" in no_validation_data.fix
    tiny_config(runs, tmp_path / "a", "data.valid_fraction=0", "validation.every=0")
    (tmp_path / "a_file").write_text("")
    refused("train.run_dir", preflight, tiny_config(runs, tmp_path / "a_file"), one_process())
    run_dir = runs.copy_stopped(tmp_path / "run")  # its checkpoint is at step 6
    shorter = refused("train.steps", preflight, tiny_config(runs, run_dir, "checkpoint.resume=auto",
                                                            "train.steps=4"), one_process())
    assert "at step 6" in shorter.problem and "train.steps >= 6" in shorter.fix


def test_a_launch_whose_every_step_is_non_finite_is_not_finished(runs, tmp_path):
    """No update applied (e.g. a llama3 rope_scaling that yields NaN): exit 3 and status "diverged" with the last
    good checkpoint kept (it used to exit 0 "finished" and save). A run whose last step alone was skipped still
    finishes, with a warning: its weights are the last good step's, and a resume would only repeat the skip."""
    run_dir = tmp_path / "run"
    run = launch_train(runs.overrides(run_dir, "train.steps=3", "checkpoint.every=1", "validation.every=0",
                                      "train.debug.nonfinite_loss_at=[3]"), nproc=1)
    assert run.ok and read_status(run_dir)["state"] == "finished", run.output[-4000:]
    assert "ended with 1 non-finite step(s) in a row" in run.output
    nothing = tmp_path / "nothing"
    run = launch_train(runs.overrides(nothing, "train.steps=2", "checkpoint.every=1", "validation.every=0",
                                      "train.max_nonfinite_steps=5", "train.debug.nonfinite_loss_at=[1,2]"), nproc=1)
    assert run.returncodes == [3], run.output[-4000:]
    assert read_status(nothing)["state"] == "diverged" and "none of this launch's 2 steps was finite" in run.output
    assert not list((nothing / "checkpoints").glob("step_*"))


def test_resume_logs_other_changed_settings_and_allowed_ones(runs, tmp_path):
    run_dir = runs.copy_stopped(tmp_path / "run")
    launch = preflight(tiny_config(runs, run_dir, "checkpoint.resume=auto", "optim.lr=0.001", "train.steps=12"),
                       one_process())
    assert launch.resume.config_changes == ("optim.lr: 0.003 -> 0.001", "train.steps: 10 -> 12")
    resumed = launch_train(runs.overrides(run_dir, "train.steps=12", "routing.q_cross=0.6"), nproc=1, resume=True)
    assert resumed.returncodes == [2] and "--allow-config-change" in resumed.output
    cmd = runs.overrides(run_dir, "train.steps=12", "routing.q_cross=0.6")
    resumed = launch_train([*cmd, "--allow-config-change"], nproc=1, resume=True)
    assert resumed.ok, resumed.output[-3000:]
    log = (run_dir / "logs" / "rank0.log").read_text()
    assert "resuming with a changed setting: routing.q_cross: 0.5 -> 0.6 (allowed by --allow-config-change)" in log
    assert "resuming with a changed setting: train.steps: 10 -> 12" in log


def _start_slow_run(runs, run_dir, min_step_s: float):
    """A training process whose steps last at least min_step_s; returns (process, lines, training, noted)."""
    args = [str(TINY_RECIPE), *runs.overrides(run_dir, "train.steps=100000", "checkpoint.every=0",
                                              "optim.warmup_steps=1", f"train.debug.min_step_s={min_step_s}")]
    proc = subprocess.Popen([sys.executable, "-m", "megakv.cli.train", *args], cwd=REPO, env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    noted, training = threading.Event(), threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "step 1/" in line:
                training.set()
            if "to abort at once" in line:
                noted.set()

    threading.Thread(target=read, daemon=True).start()
    return proc, lines, training, noted


@pytest.mark.parametrize("first,second", [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGTERM)])
def test_a_second_stop_signal_aborts_at_once(runs, tmp_path, first, second):
    from megakv.train.signals import DUPLICATE_WINDOW_S

    run_dir = tmp_path / "run"
    proc, lines, training, noted = _start_slow_run(runs, run_dir, min_step_s=5)
    try:
        assert training.wait(120), "".join(lines)[-3000:]
        os.kill(proc.pid, first)  # early in step 2, which lasts 5 s
        assert noted.wait(30), "".join(lines)[-3000:]  # the first one is acknowledged: a save is coming
        time.sleep(DUPLICATE_WINDOW_S + 0.5)  # a person's second signal, not a copy of the first
        os.kill(proc.pid, second)
        sent = time.monotonic()
        proc.wait(timeout=30)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -second, "".join(lines)[-3000:]
    assert took < 2, took
    assert read_status(run_dir)["state"] == "running"  # no save, no "preempted": it was aborted
    assert not list((run_dir / "checkpoints").glob("step_*"))


def test_copies_of_one_stop_signal_save_once(runs, tmp_path):
    """SLURM with proctrack/linuxproc signals every process of a step, and torchrun and the node launcher pass
    the signal on too: the rank gets it 2-3 times within milliseconds. That is one request to save, not a
    second signal that aborts without saving (the run used to lose its checkpoint)."""
    run_dir = tmp_path / "run"
    proc, lines, training, noted = _start_slow_run(runs, run_dir, min_step_s=2)
    try:
        assert training.wait(120), "".join(lines)[-3000:]
        os.kill(proc.pid, signal.SIGTERM)
        assert noted.wait(30), "".join(lines)[-3000:]  # handled: the copies below reach a process that has seen it
        os.kill(proc.pid, signal.SIGTERM)  # torchrun's copy and the node launcher's, milliseconds later
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines)[-3000:]
    assert read_status(run_dir)["state"] == "preempted"
    assert list((run_dir / "checkpoints").glob("step_*"))



STOP_THEN_LONG_C_CALL = """
import ctypes, sys, time
from megakv.train.signals import StopRequest
stop = StopRequest().install()
print("ready", flush=True)
while not stop.requested:
    time.sleep(0.01)
print("stopping", flush=True)
ctypes.CDLL(None).system(b"sleep 8")  # a long C call that runs no Python (as a kernel or a collective)
print("survived", flush=True)
"""


def test_a_second_signal_aborts_even_inside_a_long_c_call(tmp_path):
    """After the duplicate window the abort is armed at the C level, not by a Python handler that could only run
    once the main thread came back from C (a hung collective: never)."""
    from megakv.train.signals import DUPLICATE_WINDOW_S

    proc = subprocess.Popen([sys.executable, "-c", STOP_THEN_LONG_C_CALL], cwd=REPO, env=_child_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout.readline().startswith("megakv-train: SIGTERM received")
        assert proc.stdout.readline().strip() == "stopping"
        time.sleep(DUPLICATE_WINDOW_S + 1.0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM, proc.stdout.read()


def test_a_second_launch_on_a_run_directory_in_use_is_refused(runs, tmp_path):
    """Two launches on one run directory (a job resubmitted while it still runs) wrote into each other's save
    directories, pruned each other's checkpoints, interleaved metrics.jsonl, and both exited 0. The second is
    refused on every rank, naming the first, before writing anything; a killed holder's lock goes with it."""
    import socket

    from megakv.config import load_config

    run_dir = tmp_path / "run"
    proc, lines, training, _ = _start_slow_run(runs, run_dir, min_step_s=1)
    try:
        assert training.wait(120), "".join(lines)[-3000:]
        second = launch_train(runs.overrides(run_dir, "train.steps=4"), nproc=2, resume=True)
        assert second.returncodes == [2, 2], second.output[-3000:]
        assert (f"another launch is using it (megakv-train pid {proc.pid} on {socket.gethostname()}, since "
                in second.output), second.output[-3000:]
        assert proc.poll() is None  # the first runs on, with its own config
        assert load_config(run_dir / "config.yaml", []).train.steps == 100000
    finally:
        proc.kill()  # SIGKILL: no clean-up runs, and the lock still goes with the process
        proc.wait()
    again = launch_train(runs.overrides(run_dir, "train.steps=2"), nproc=1, resume=True)
    assert again.ok and "another launch is using it" not in again.output, again.output[-3000:]


def test_a_sigusr1_during_the_launch_is_kept_for_the_first_step(runs, tmp_path):
    """SLURM's pre-timeout SIGUSR1 can arrive while the ranks still run their checks or wait at the rendezvous
    (minutes on a large job). It was lost there (the node launcher starts the ranks with it ignored; here, with
    its default action, it killed the rank) while the batch script requeued the job. It is now caught from the
    start and acted on at the first step: checkpoint, exit 0, status preempted."""
    from train_helpers import free_port

    run_dir = tmp_path / "run"
    args = [str(TINY_RECIPE), *runs.overrides(run_dir, "train.steps=6")]
    port = str(free_port())

    def rank(number: int) -> subprocess.Popen:
        env = _child_env({"RANK": str(number), "LOCAL_RANK": str(number), "WORLD_SIZE": "2", "LOCAL_SIZE": "2",
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        return subprocess.Popen([sys.executable, "-m", "megakv.cli.train", *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    first = rank(0)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "config.yaml").exists():  # rank 0 is past its checks, waiting for rank 1
            assert time.monotonic() < deadline and first.poll() is None
            time.sleep(0.2)
        first.send_signal(signal.SIGUSR1)
        time.sleep(1)
        second = rank(1)
        outputs = [proc.communicate(timeout=240)[0] for proc in (first, second)]
    finally:
        for proc in (first,):
            if proc.poll() is None:
                proc.kill()
    assert [first.returncode, second.returncode] == [0, 0], outputs[0][-3000:]
    assert "stop requested (SIGUSR1): saving a checkpoint at step 1" in outputs[0]
    assert read_status(run_dir)["state"] == "preempted"
    assert (run_dir / "checkpoints" / "step_00000001").is_dir()


def test_bare_srun_of_several_tasks_is_refused(runs, tmp_path):
    """`srun --ntasks=2 megakv-train ...` (one task per GPU, as other frameworks launch) ran two separate
    one-process trainings into one run directory (SLURM audit, on the local cluster). The variables are what
    srun sets in each task; the refusal comes before anything is written."""
    env = _child_env({"SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1"})
    done = subprocess.run([sys.executable, "-m", "megakv.cli.train", str(TINY_RECIPE),
                           *runs.overrides(tmp_path / "run")], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "one of 2 SLURM tasks but no launcher set WORLD_SIZE/RANK" in done.stderr
    assert "slurm/pretrain.sbatch" in done.stderr and not (tmp_path / "run").exists()


def test_a_fresh_launch_does_not_write_over_a_finished_run_that_saved_nothing(runs, tmp_path):
    """checkpoint.save_final=false: the guard against starting fresh over a run looked at checkpoints only, so a
    second launch replaced the finished run's config.yaml and cut its metrics.jsonl without a word."""
    run_dir = tmp_path / "run"
    first = launch_train(runs.overrides(run_dir, "train.steps=3", "checkpoint.every=0", "checkpoint.save_final=false"),
                         nproc=1)
    assert first.ok and read_status(run_dir)["state"] == "finished", first.output[-3000:]
    config, metrics = (run_dir / "config.yaml").read_text(), (run_dir / "metrics.jsonl").read_text()
    again = launch_train(runs.overrides(run_dir, "train.steps=2", "optim.lr=1e-3", "checkpoint.every=0"), nproc=1)
    assert again.returncodes == [2] and "holds a run that finished (status.json) without a checkpoint" in again.output
    assert (run_dir / "config.yaml").read_text() == config and (run_dir / "metrics.jsonl").read_text() == metrics
    restarted = launch_train(runs.overrides(run_dir, "train.steps=2", "checkpoint.every=0"), nproc=1, resume=True)
    assert restarted.ok, restarted.output[-3000:]  # asked for: the run starts again from scratch


def test_a_read_only_data_directory_without_a_cache_is_named_before_launch(runs, tmp_path):
    """Data shared read-only (another user's, a read-only mount) and no index cache built yet: the launch
    failed after the process group; --dry-run and the launch checks now say so, naming data.cache_dir. A real
    read-only bind mount (root here; elsewhere the test cannot make one)."""
    import shutil

    shared = tmp_path / "shared"
    shutil.copytree(runs.dataset.parent, shared, ignore=shutil.ignore_patterns("index-cache"))
    done = subprocess.run(["mount", "--bind", "-o", "ro", str(shared), str(shared)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("needs permission to bind-mount a directory read-only (root)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(shared)], capture_output=True)
        prefix = shared / runs.dataset.name
        with pytest.raises(ConfigError) as info:
            preflight(tiny_config(runs, tmp_path / "run", f"data.datasets=[{prefix}]"), one_process())
        assert info.value.field == "data.cache_dir" and str(shared / "index-cache") in info.value.problem
        launch = preflight(tiny_config(runs, tmp_path / "run", f"data.datasets=[{prefix}]",
                                       f"data.cache_dir={tmp_path / 'cache'}"), one_process())
        assert launch.resume is None  # with a cache directory of one's own the same data is fine
    finally:
        subprocess.run(["umount", str(shared)], capture_output=True)
