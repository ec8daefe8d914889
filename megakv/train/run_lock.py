"""One launch per run directory at a time.

Two launches on one run directory (a job resubmitted while it still runs, two array tasks with one config)
wrote into each other's temporary save directories, moved or pruned each other's checkpoints and interleaved
metrics.jsonl, and both exited 0. Rank 0 of a launch holds an exclusive lock on RUN_DIR/.megakv-run.lock for
as long as it runs; the operating system releases it when the process ends, however it ends (a kill -9 too,
so a stale lock needs no clean-up). On a shared filesystem the lock is as good as the filesystem's locking:
NFSv4 and Lustre (mounted with -o flock) lock across nodes. The file also says who holds it, for the error.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from megakv.config.errors import ConfigError

LOCK_FILE = ".megakv-run.lock"


@dataclass
class RunDirLock:
    run_dir: Path
    fd: int

    @classmethod
    def take(cls, run_dir: str | Path, what: str = "megakv-train") -> RunDirLock:
        """Lock `run_dir` (an existing directory) or raise ConfigError naming the launch that holds it."""
        run_dir = Path(run_dir)
        path = run_dir / LOCK_FILE
        try:  # O_NOFOLLOW: a link planted in a received run directory must not be written through
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise ConfigError("train.run_dir", str(run_dir), f"cannot open its lock file {path} ({e.strerror})",
                              "remove it if it is a link, or choose another train.run_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise ConfigError("train.run_dir", str(run_dir), f"another launch is using it ({holder}); two launches on "
                              "one run directory would overwrite each other's checkpoints and metrics",
                              "wait for it to finish or cancel it, or choose another train.run_dir") from None
        holder = {"what": what, "host": socket.gethostname(), "pid": os.getpid(),
                  "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        return cls(run_dir, fd)

    def release(self) -> None:
        os.close(self.fd)  # the file stays: removing it would let a third launch lock a file about to vanish


def _describe_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        job = f", SLURM job {holder['slurm_job']}" if holder.get("slurm_job") else ""
        return f"{holder['what']} pid {holder['pid']} on {holder['host']}{job}, since {holder['since']}"
    except (ValueError, KeyError, TypeError, OSError):  # being written this instant, or from another version
        return "held by a process whose details could not be read"
