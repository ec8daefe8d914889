"""A damaged newest checkpoint is passed over, loudly, for the newest intact one: the completeness marker
records every file's size and sha256. Every refusal names the file and the fix; a crash's leftovers are
removed at the next start; a full disk during a save says so."""

from __future__ import annotations

import contextlib
import json
import subprocess
from pathlib import Path

import pytest
from checkpoint_helpers import STOP_AT, one_process, shared_runs, tag, tiny_config
from train_helpers import launch_train, read_metrics, read_status, step_losses

from megakv.config import ConfigError
from megakv.train.checkpoint import CheckpointError, discover, verify
from megakv.train.preflight import preflight

MODEL_FILE = "mp_rank_00_model_states.pt"
OPTIM_FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
RNG_FILE = "rng/rank00000.json"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def damage(tag_dir: Path, how: str) -> str:
    """Damage one file of a checkpoint; returns the file name a report must name."""
    if how == "truncate_model":
        path = tag_dir / MODEL_FILE
        path.write_bytes(path.read_bytes()[:4000])
    elif how == "truncate_optimizer":
        path = tag_dir / OPTIM_FILE
        path.write_bytes(path.read_bytes()[:-100])
    elif how == "delete_model":
        path = tag_dir / MODEL_FILE
        path.unlink()
    elif how == "flip_rng_byte":  # same size, other contents: only the checksum sees it
        path = tag_dir / RNG_FILE
        data = bytearray(path.read_bytes())
        data[40] ^= 1
        path.write_bytes(bytes(data))
    elif how == "state_not_json":
        path = tag_dir / "megakv_state.json"
        path.write_text("{ this is not json")
    else:
        raise ValueError(how)
    return path.name


@pytest.mark.parametrize("how", ["truncate_model", "truncate_optimizer", "delete_model", "flip_rng_byte",
                                 "state_not_json"])
def test_damaged_latest_falls_back_to_the_newest_intact_checkpoint(runs, tmp_path, how):
    run_dir = runs.copy_stopped(tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    name = damage(ckpts / tag(STOP_AT), how)
    problem = verify(ckpts / tag(STOP_AT))
    assert problem is not None and name in problem
    assert verify(ckpts / tag(STOP_AT - 2)) is None
    found = discover(ckpts)
    assert found.found[0] == tag(STOP_AT - 2) and len(found.damaged) == 1 and name in found.damaged[0]
    launch = preflight(tiny_config(runs, run_dir, "checkpoint.resume=auto"), one_process())
    assert launch.resume.tag == tag(STOP_AT - 2)
    assert any("DAMAGED CHECKPOINT" in n and name in n for n in launch.resume.notices), launch.resume.notices


def test_only_rank_0_reads_checksums_and_a_damage_only_they_show_stops_a_multi_rank_launch(runs, tmp_path):
    """Every rank hashed the whole checkpoint before training: world-size times its size read from a shared
    filesystem (filesystem audit). Rank 0 checks checksums, the others sizes; a same-size damage, which only the
    checksums show, would make the ranks pick different checkpoints, so it stops the launch naming the fix."""
    from megakv.cli.convert import main as convert_main
    from megakv.parallel.layout import ParallelLayout

    run_dir = runs.copy_stopped(tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    assert convert_main(["to-universal", str(run_dir)]) == 0  # two ranks resume the one-rank run through it
    damage(ckpts / tag(STOP_AT), "flip_rng_byte")
    cfg = tiny_config(runs, run_dir, "checkpoint.resume=auto")
    other_rank = preflight(cfg, ParallelLayout(world_size=2, rank=1, local_rank=1))
    assert other_rank.resume.tag == f"{tag(STOP_AT)}_universal"  # sizes only: it cannot tell
    with pytest.raises(CheckpointError) as info:
        preflight(cfg, ParallelLayout(world_size=2, rank=0, local_rank=0))
    assert f"mv {ckpts / tag(STOP_AT)} {ckpts / tag(STOP_AT)}.damaged" in str(info.value)
    assert RNG_FILE.split("/")[-1] in str(info.value)
    damage(ckpts / tag(STOP_AT), "truncate_model")  # a damage the sizes show: every rank passes it over alike
    for rank in (0, 1):  # to the previous step, which has no conversion: both ranks say so about that step
        with pytest.raises(ConfigError, match=f"{tag(STOP_AT - 2)} was written by 1 data-parallel"):
            preflight(cfg, ParallelLayout(world_size=2, rank=rank, local_rank=rank))


def test_a_shard_missing_from_disk_and_manifest_is_named_not_a_traceback(runs, tmp_path):
    """A checkpoint whose manifest does not list a file DeepSpeed's load needs (an incomplete copy, re-recorded):
    it passes the manifest check, and the load's FileNotFoundError was a traceback, exit 1."""
    run_dir = runs.copy_stopped(tmp_path / "run")
    tag_dir = run_dir / "checkpoints" / tag(STOP_AT)
    (tag_dir / OPTIM_FILE).unlink()
    state = json.loads((tag_dir / "megakv_state.json").read_text())
    del state["files"][OPTIM_FILE]
    (tag_dir / "megakv_state.json").write_text(json.dumps(state))
    assert verify(tag_dir) is None
    resumed = launch_train(runs.overrides(run_dir), nproc=1, resume=True)
    assert resumed.returncodes == [2], resumed.output[-4000:]
    assert f"checkpoint {tag_dir} lacks {tag_dir / OPTIM_FILE}" in resumed.output
    assert "Traceback" not in resumed.output and "move it aside" in resumed.output


def test_no_intact_checkpoint_is_refused_naming_each_damaged_file(runs, tmp_path):
    run_dir = runs.copy_stopped(tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    for step in (2, 4, 6):
        damage(ckpts / tag(step), "truncate_model")
    with pytest.raises(CheckpointError) as info:
        preflight(tiny_config(runs, run_dir, "checkpoint.resume=auto"), one_process())
    text = str(info.value)
    assert all(str(ckpts / tag(s) / MODEL_FILE) in text for s in (2, 4, 6)) and "Fix:" in text
    # a fresh start there is refused too: the damaged checkpoints are not written over
    with pytest.raises(ConfigError, match="already holds"):
        preflight(tiny_config(runs, run_dir), one_process())


def test_resume_with_another_zero_stage_is_refused_before_launch(runs, tmp_path):
    run_dir = runs.copy_stopped(tmp_path / "run")
    with pytest.raises(ConfigError) as info:
        preflight(tiny_config(runs, run_dir, "checkpoint.resume=auto", "parallel.zero_stage=3"), one_process())
    assert info.value.field == "parallel.zero_stage" and "stage 2" in info.value.problem
    assert "parallel.zero_stage=2" in info.value.fix


def test_resume_past_a_truncated_checkpoint_is_bit_exact_and_cleans_up(runs, tmp_path):
    """End to end: the newest checkpoint truncated, a crash's partial save left behind, metrics written past
    the checkpoint: --resume auto warns naming the file, continues from the previous one bit for bit, removes
    the partial save, keeps the damaged directory aside, and the metrics hold each step once."""
    run_dir = runs.copy_stopped(tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    damage(ckpts / tag(STOP_AT), "truncate_model")
    partial = ckpts / f".tmp-{tag(STOP_AT + 2)}"
    partial.mkdir()
    (partial / MODEL_FILE).write_bytes(b"partial")
    resumed = launch_train(runs.overrides(run_dir), nproc=1, resume=True)
    assert resumed.ok, resumed.output[-4000:]
    assert "WARNING: DAMAGED CHECKPOINT" in resumed.output and str(ckpts / tag(STOP_AT) / MODEL_FILE) in resumed.output
    assert f"resumed from {ckpts / tag(STOP_AT - 2)} at step {STOP_AT - 2}" in resumed.output
    assert not partial.exists()
    losses, reference = step_losses(run_dir), step_losses(runs.reference)
    assert all(losses[s] == reference[s] for s in range(STOP_AT - 1, 11))
    train_steps = [r["step"] for r in read_metrics(run_dir) if "loss_exact" in r]
    assert train_steps == list(range(1, 11))  # steps 5-6 of the first run were dropped, not duplicated
    aside = [p.name for p in ckpts.iterdir() if p.name.startswith(f"{tag(STOP_AT)}.superseded-")]
    assert len(aside) == 1 and verify(ckpts / tag(STOP_AT)) is None
    assert read_status(run_dir)["state"] == "finished"


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    """A real tmpfs of `size` mounted at `path` (root only; skipped elsewhere), to fill a disk for real."""
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("needs permission to mount a small tmpfs (root) to fill a disk for real")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def test_a_full_disk_during_a_save_is_reported_as_such(runs, tmp_path):
    """checkpoints/ on a 1 MiB filesystem: the first save cannot fit. The error says the disk is full, names
    the directory and the fix, status.json says failed; the next start removes the partial save."""
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    with small_filesystem(ckpts, "1m"):
        full = launch_train(runs.overrides(run_dir, "train.steps=2"), nproc=1)
        assert full.returncodes == [2], full.output[-4000:]
        assert "no space left (or a quota or file-size limit reached) on the device" in full.output
        assert str(ckpts) in full.output
        assert "free disk space" in full.output
        status = read_status(run_dir)
        assert status["state"] == "failed" and "no space left" in status["error"]
        assert [p.name for p in ckpts.iterdir() if p.name.startswith(".tmp-")] == [f".tmp-{tag(2)}"]
        # the next start cleans the partial save up (and, with nothing saved, starts fresh)
        again = launch_train(runs.overrides(run_dir, "train.steps=2", "checkpoint.save_final=false",
                                            "checkpoint.every=0"), nproc=1, resume=True)
        assert again.ok, again.output[-4000:]
        assert not [p for p in ckpts.iterdir() if p.name.startswith(".tmp-")]
        assert json.loads((run_dir / "status.json").read_text())["state"] == "finished"


def test_a_full_disk_under_the_whole_run_directory_is_reported_not_a_traceback(runs, tmp_path):
    """The whole run directory on a small filesystem (the test above mounts checkpoints/ only): recording the
    failure in status.json hit the full disk too and turned the clear message into a traceback, exit 1."""
    run_dir = tmp_path / "run"
    with small_filesystem(run_dir, "600k"):
        full = launch_train(runs.overrides(run_dir, "train.steps=2"), nproc=1)
        assert full.returncodes == [2], full.output[-4000:]
        assert "quota or file-size limit reached) on the device" in full.output
        assert "Traceback" not in full.output, full.output[-4000:]


def test_status_json_on_a_full_disk_or_damaged(tmp_path):
    """status.json is written at every log line: on a full disk that write came first and was a bare OSError
    traceback leaving status.json.tmp; a zero-filled status.json (a crash) failed a fresh launch's check with
    'Expecting value'. A real write failure: RLIMIT_FSIZE in a child process."""
    import sys

    from megakv.train.run_dir import read_status

    script = f"""
import resource
from megakv.train.run_dir import write_status
resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
try:
    write_status({str(tmp_path)!r}, "running", step=3, note="x" * 200)
except OSError as e:
    print(type(e).__name__, e)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("RunDirWriteError") and "status.json" in done.stdout, done.stdout + done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no status.json.tmp left
    (tmp_path / "status.json").write_bytes(b"\0\0\0\0")
    assert read_status(tmp_path) is None


def test_metrics_on_a_full_disk_name_the_file_and_the_fix(tmp_path):
    """Filled between saves, the disk failed the metrics write with a bare OSError and a chain of tracebacks.
    A real write failure: the file-size limit (RLIMIT_FSIZE) of a child process, EFBIG at the limit."""
    import sys

    script = f"""
import resource
from pathlib import Path
from megakv.train.metrics import MetricsWriter
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
writer = MetricsWriter(Path({str(tmp_path / "metrics.jsonl")!r}), None)
try:
    for step in range(1000):
        writer.write(step, {{"train/loss": 1.0}}, note="x" * 100)
except OSError as e:
    print(type(e).__name__, e)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("RunDirWriteError"), done.stdout + done.stderr
    assert f"cannot write {tmp_path / 'metrics.jsonl'}" in done.stdout and "--resume auto" in done.stdout
