"""Exclusive locks that say who holds them: one launch per run directory, one writer per data output.

`flock` on a lock file: the kernel releases it however the holder ends (kill -9 too), so a lock file left
behind never blocks. The holder writes what it is (tool, pid, host, SLURM job, since when) into the file,
for the message a refused second holder prints. The file is opened without following a link: one planted
in a directory someone sent you would otherwise be emptied and written through. A filesystem without
`flock` (Lustre mounted without -o flock, some FUSE mounts) gets a warning and no lock, not a failed job.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

NO_LOCKING = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)


class LockHeldError(Exception):
    """Another process holds the lock; `holder` is what it wrote (possibly empty: it is still writing it)."""

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = path, holder
        super().__init__(f"{path} is held by {describe_holder(holder)}")


class LockLinkError(Exception):
    """The lock file is a link (planted, never written by megakv)."""


@dataclass
class HeldLock:
    path: Path
    fd: int | None  # None: the filesystem cannot lock (warned)

    def release(self, remove: bool = False) -> None:
        """Let go; `remove` deletes the file first, while still holding it (nobody locks a file about to vanish)."""
        if remove and self.fd is not None:
            self.path.unlink(missing_ok=True)
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def take_lock(path: str | Path, what: str) -> HeldLock:
    """Lock `path` (created if needed) for `what` (e.g. "megakv-train"), or raise LockHeldError / LockLinkError."""
    path = Path(path)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise LockLinkError(f"{path} is a link; megakv never makes one there, and would write through it. "
                                    "Fix: remove the link") from None
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise LockHeldError(path, holder) from None
        except OSError as e:
            os.close(fd)
            if e.errno not in NO_LOCKING:
                raise
            warnings.warn(f"the filesystem of {path} cannot lock files ({e.strerror}): nothing stops a second job "
                          "from writing here at the same time", stacklevel=2)
            return HeldLock(path, None)
        try:  # a holder before us may have removed the file after we opened it: lock the file that is there
            if os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    record = {"what": what, "pid": os.getpid(), "host": socket.gethostname(),
              "slurm_job": os.environ.get("SLURM_JOB_ID"), "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    try:  # a full disk may refuse even these bytes; the lock holds without them
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except OSError:
        pass
    return HeldLock(path, fd)


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):  # being written this instant, or damaged
        return {}


def printable(value) -> str:
    """A holder's field as text fit for a terminal or a log (the lock file may come from someone else)."""
    return "".join(c if c.isprintable() else "?" for c in str(value))[:200]


def describe_holder(holder: dict) -> str:
    if not {"what", "pid", "host"} <= holder.keys():
        return "a process whose details could not be read"
    shown = {k: printable(v) for k, v in holder.items()}
    job = f", SLURM job {shown['slurm_job']}" if holder.get("slurm_job") else ""
    since = f", since {shown['since']}" if holder.get("since") else ""
    return f"{shown['what']} pid {shown['pid']} on {shown['host']}{job}{since}"
