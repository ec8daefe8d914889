"""One writer per output prefix: megakv-prep, megakv-merge and megakv-qa prep hold `PREFIX.tmp-lock` while
they write PREFIX (and PREFIX_lossmask).

Without it two jobs on one prefix raced: both exited 0, the last writer won, and the other's summary
("merged 400 documents") described data that was not there. A second writer is refused at once, naming
the holder. The kernel releases the lock however the holder ends (kill -9 included), so a stale lock file
never blocks; a clean end also removes it. The new holder removes the temporaries a killed writer left
behind (they can hold gigabytes), and only names of exactly megakv's temporary shape for this prefix.
"""

from __future__ import annotations

import contextlib
import glob
from pathlib import Path

from megakv.data.errors import DataError
from megakv.data.indexed import is_temporary_of, mask_prefix
from megakv.locking import LockHeldError, LockLinkError, printable, take_lock

LOCK_SUFFIX = ".tmp-lock"  # temporary-looking, like every other leftover


def lock_path(prefix: str | Path) -> Path:
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + LOCK_SUFFIX)


def make_output_dir(prefix: str | Path) -> None:
    """Create the directory of `prefix`; a file in the way is named (mkdir said only "[Errno 17] File exists")."""
    prefix = Path(prefix)
    for parent in reversed(prefix.parents):
        if parent.exists() and not parent.is_dir():
            raise DataError(f"the output prefix {prefix} lies under {parent}, which is a file, not a directory",
                            f"choose an --output-prefix inside a directory, or move the file {parent} away")
    prefix.parent.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def output_lock(prefix: str | Path, tool: str):
    """Hold the lock of `prefix` for `tool` (e.g. "megakv-merge"); raises DataError while another holds it."""
    prefix = Path(prefix)
    make_output_dir(prefix)
    path = lock_path(prefix)
    try:
        lock = take_lock(path, tool)
    except LockLinkError as e:
        raise DataError(str(e).split(". Fix: ")[0], "remove the link") from None
    except LockHeldError as e:
        holder = e.holder
        where = (f"pid {printable(holder['pid'])} on {printable(holder['host'])}, which holds {path}"
                 if {"pid", "host"} <= holder.keys() else f"it holds {path}")
        raise DataError(f"another {printable(holder.get('what', 'megakv job'))} is writing {prefix} ({where})",
                        "wait for it to finish, or choose another --output-prefix") from None
    try:
        remove_stale_temporaries(prefix)
        yield
    finally:
        lock.release(remove=True)


def remove_stale_temporaries(prefix: str | Path) -> list[Path]:
    """Remove what a killed writer of `prefix` left (PREFIX.bin.tmp-<pid>-<hex>, ...; also of PREFIX_lossmask,
    which is written under the same lock); call only while holding the lock. Returns what was removed."""
    prefix = Path(prefix)
    removed = []
    for stem in (prefix.name, mask_prefix(prefix).name):
        for name in glob.glob(glob.escape(stem) + ".*.tmp-*", root_dir=prefix.parent):
            if is_temporary_of(name, stem):
                (prefix.parent / name).unlink(missing_ok=True)
                removed.append(prefix.parent / name)
    return removed
