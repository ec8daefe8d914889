"""The locks on run directories and data outputs (megakv/locking.py): a planted link is never written through,
a requeued job waits for its own earlier run's lock, and an in-process caller gets everything back."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest
from train_helpers import TINY_RECIPE

from megakv.config import ConfigError
from megakv.data.errors import DataError
from megakv.data.output_lock import output_lock
from megakv.locking import take_lock
from megakv.train.run_lock import LOCK_FILE, take_run_dir


def test_a_planted_link_named_like_a_lock_is_refused_and_its_target_kept(tmp_path):
    """A data directory someone sent you with `all.tmp-lock -> ~/.bashrc`: opening the lock followed the link,
    and writing the holder's name emptied the target (review of the day's diff, reproduced)."""
    victim = tmp_path / "bashrc"
    victim.write_text("precious\n")
    received = tmp_path / "received"
    received.mkdir()
    (received / "all.tmp-lock").symlink_to(victim)
    with pytest.raises(DataError, match="is a link"):
        with output_lock(received / "all", "megakv-merge"):
            pass
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK_FILE).symlink_to(victim)
    with pytest.raises(ConfigError, match="is a link"):
        take_run_dir(run_dir)
    assert victim.read_text() == "precious\n"


def test_a_requeued_job_waits_for_its_own_earlier_runs_lock(tmp_path, monkeypatch):
    """On NFSv4 or Lustre a crashed node's lock stays until its lease ends; the requeued job (same SLURM job id)
    waits for it instead of failing, while another job is refused at once."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    earlier = take_lock(tmp_path / LOCK_FILE, "megakv-train")  # the earlier run of this job, on a dead node
    threading.Timer(1.0, earlier.release).start()  # ... until its lease ends
    started = time.monotonic()
    take_run_dir(tmp_path, own_job_wait_s=30).release()
    assert 0.8 < time.monotonic() - started < 20
    held = take_lock(tmp_path / LOCK_FILE, "megakv-train")
    monkeypatch.setenv("SLURM_JOB_ID", "4243")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="another launch is using it .*SLURM job 4242"):
        take_run_dir(tmp_path, own_job_wait_s=30)
    assert time.monotonic() - started < 5
    held.release()


def test_a_launch_that_stops_early_gives_back_the_lock_and_sigusr1(tmp_path):
    """In-process callers (tests, notebooks): a launch refused after taking the run directory's lock kept it
    (the same process could not launch there again) and left SIGUSR1 to a dead handler."""
    from megakv.cli.train import main as train_main

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    before = signal.getsignal(signal.SIGUSR1)
    assert train_main([str(TINY_RECIPE), f"train.run_dir={run_dir}", f"data.datasets=[{tmp_path / 'none'}]"]) == 2
    assert signal.getsignal(signal.SIGUSR1) == before
    take_run_dir(run_dir, own_job_wait_s=0).release()  # free again
    assert not Path(run_dir / LOCK_FILE).is_symlink()
