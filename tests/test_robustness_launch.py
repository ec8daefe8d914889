"""A rank that fails makes every other rank exit non-zero with that rank's message, quickly: a launch check
that fails before the process group, one that fails after it (2 gloo processes), and a frozen rank
(SIGSTOP), which ends its peer after parallel.timeout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from checkpoint_helpers import shared_runs
from train_helpers import REPO, TINY_RECIPE, _child_env, _collect, free_port, read_metrics, read_status

pytestmark = [pytest.mark.distributed]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def start_ranks(per_rank_overrides: list[list[str]]) -> list[subprocess.Popen]:
    """One megakv-train process per rank (env:// as torchrun would set it), each with its own overrides."""
    port, world = str(free_port()), len(per_rank_overrides)
    procs = []
    for rank, overrides in enumerate(per_rank_overrides):
        env = _child_env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                          "LOCAL_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        procs.append(subprocess.Popen([sys.executable, "-m", "megakv.cli.train", str(TINY_RECIPE), *overrides],
                                      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def test_a_rank_failing_its_checks_before_the_process_group_stops_the_others(runs, tmp_path):
    run_dir = tmp_path / "run"
    good = runs.overrides(run_dir, "parallel.timeout=120")
    bad = runs.overrides(run_dir, "parallel.timeout=120", f"data.datasets=[{tmp_path / 'missing' / 'train'}]")
    started = time.monotonic()
    done = _collect(start_ranks([good, bad]), timeout=100)
    elapsed = time.monotonic() - started
    assert done.returncodes == [2, 2], done.output[-4000:]
    assert "stopping because rank 1 failed" in done.output and "data.datasets[0]" in done.output
    assert elapsed < 60, elapsed  # not parallel.timeout: as soon as rank 1 said why
    assert not (run_dir / "checkpoints").exists()


def test_a_rank_failing_after_the_process_group_stops_the_others(runs, tmp_path):
    """Rank 1's data is too short for one sample (found when its samples are built, after the process group;
    damaged files are refused before it): rank 0, waiting in a collective, exits with rank 1's message;
    status.json says failed, with it."""
    import numpy as np

    from megakv.data.indexed import IndexedWriter

    copy = tmp_path / "copy"
    copy.mkdir()
    with IndexedWriter(copy / "train", np.uint16) as writer:
        writer.add_document(np.array([5, 6, 7, 8, 2]))
        writer.finalize()
    run_dir = tmp_path / "run"
    good = runs.overrides(run_dir, "parallel.timeout=120")
    bad = runs.overrides(run_dir, "parallel.timeout=120", f"data.datasets=[{copy / 'train'}]",
                         f"data.tokenizer={runs.dataset.parent / 'tokenizer'}")
    started = time.monotonic()
    done = _collect(start_ranks([good, bad]), timeout=100)
    elapsed = time.monotonic() - started
    assert done.returncodes == [2, 2], done.output[-4000:]
    assert "stopping because rank 1 failed" in done.output and str(copy / "train") in done.output
    assert elapsed < 60, elapsed
    status = read_status(run_dir)
    assert status["state"] == "failed" and status["failed_rank"] == 1 and str(copy / "train") in status["error"]


@pytest.mark.slow
@pytest.mark.parametrize("frozen", [1, 0])  # rank 0 also hosts the env:// store: calls to it block, not fail
def test_a_frozen_rank_ends_its_peer_after_parallel_timeout(runs, tmp_path, frozen):
    run_dir = tmp_path / "run"
    overrides = runs.overrides(run_dir, "parallel.timeout=15", "train.steps=100000", "checkpoint.every=0",
                               "checkpoint.save_final=false", "optim.warmup_steps=1", "logging.log_every=1")
    procs = start_ranks([overrides, overrides])
    try:
        deadline = time.monotonic() + 120
        while not ((run_dir / "metrics.jsonl").is_file() and len(read_metrics(run_dir)) >= 2):
            assert time.monotonic() < deadline and procs[0].poll() is None, "training never started"
            time.sleep(0.2)
        os.kill(procs[frozen].pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        survivor = procs[1 - frozen]
        out, _ = survivor.communicate(timeout=90)
        waited = time.monotonic() - frozen_at
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
    assert survivor.returncode not in (0, None), out[-3000:]
    assert 10 < waited < 60, (waited, out[-3000:])  # bounded by parallel.timeout=15, not torch's 30 minutes
    if frozen == 1:  # rank 0 survives and records it (status.json is rank 0's to write), at the step it reached
        status = read_status(run_dir)
        assert status["state"] == "failed" and status["step"] >= 2, status  # it said step 0 (the launch's start)
    else:
        assert "lost contact with the rendezvous store" in out, out[-3000:]


def test_a_run_directory_not_shared_by_every_node_is_refused_before_training(runs, tmp_path):
    """Two nodes, faked with a private mount namespace for rank 1 (one machine here): train.run_dir on node-local
    storage is a different directory for rank 1. Both ranks stop with exit 2 naming it before any step; before,
    training ran and every checkpoint was split across the nodes' disks, none resumable."""
    node_local = tmp_path / "scratch"  # rank 1 gets its own empty tmpfs here, as another node's /tmp
    node_local.mkdir()
    run_dir = node_local / "run"
    overrides = runs.overrides(run_dir, "parallel.timeout=120")
    port = free_port()
    procs = []
    for rank in range(2):
        env = _child_env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_SIZE": "2",
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        cmd = [sys.executable, "-m", "megakv.cli.train", str(TINY_RECIPE), *overrides]
        if rank == 1:
            cmd = ["unshare", "--mount", "sh", "-c", 'mount -t tmpfs -o size=64m tmpfs "$0" && exec "$@"',
                   str(node_local), *cmd]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    done = _collect(procs, timeout=200)
    if "mount" in done.output and "permission denied" in done.output.lower():
        pytest.skip("needs permission to mount a private tmpfs (root) to give one rank another filesystem")
    assert done.returncodes == [2, 2], done.output[-4000:]
    assert f"'train.run_dir' = '{run_dir}': it is not the same directory on every node: rank(s) 1" in done.output
    assert "Traceback" not in done.output
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "metrics.jsonl").exists()
    assert not (run_dir / ".megakv-shared-check").exists()  # every 2-rank test passes the check: none leaves it

