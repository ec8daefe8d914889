"""One launch per run directory at a time.

Two launches on one run directory (a job resubmitted while it still runs, two array tasks with one config)
wrote into each other's temporary save directories, moved or pruned each other's checkpoints and interleaved
metrics.jsonl, and both exited 0. Rank 0 of a launch holds RUN_DIR/.megakv-run.lock (megakv/locking.py) for
as long as it runs. On a shared filesystem the lock is as good as the filesystem's locking: NFSv4 and Lustre
(mounted with -o flock) lock across nodes, and keep a crashed node's lock until its lease ends, so a requeued
job that finds its own job id on the lock waits for that instead of failing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from megakv.config.errors import ConfigError
from megakv.locking import HeldLock, LockHeldError, LockLinkError, describe_holder, take_lock

LOCK_FILE = ".megakv-run.lock"
OWN_JOB_WAIT_S = 180.0  # longer than NFSv4's default lease (90 s) after which a dead node's locks go
POLL_S = 0.5


def take_run_dir(run_dir: str | Path, own_job_wait_s: float = OWN_JOB_WAIT_S) -> HeldLock:
    """Lock `run_dir` (an existing directory) or raise ConfigError naming the launch that holds it."""
    run_dir = Path(run_dir)
    deadline = time.monotonic() + own_job_wait_s
    while True:
        try:
            return take_lock(run_dir / LOCK_FILE, "megakv-train")
        except LockLinkError as e:
            raise ConfigError("train.run_dir", str(run_dir), str(e), "remove the link") from None
        except LockHeldError as e:
            own_job = os.environ.get("SLURM_JOB_ID")
            if own_job and e.holder.get("slurm_job") == own_job and time.monotonic() < deadline:
                time.sleep(POLL_S)  # this job's earlier run (requeued): its lock goes with its node's lease
                continue
            raise ConfigError("train.run_dir", str(run_dir), f"another launch is using it "
                              f"({describe_holder(e.holder)}); two launches on one run directory would overwrite "
                              "each other's checkpoints and metrics",
                              "wait for it to finish or cancel it, or choose another train.run_dir") from None
