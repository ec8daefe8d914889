"""Replacing a directory with a freshly written one, so that readers find the old one or the new one."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_directory(new: str | Path, target: str | Path) -> None:
    """Put the directory `new` (a sibling of `target`, on the same filesystem) at `target`.

    What `target` held is renamed aside, `new` is renamed in, and only then is the old one deleted: `target`
    is missing for the time between two renames at most, never while a tree is deleted. If the second rename
    fails the old directory is put back.
    """
    new, target = Path(new), Path(target)
    if target.is_symlink() or (target.exists() and not target.is_dir()):  # never swap a user's link or file
        raise NotADirectoryError(f"{target} is a link or a file, not a directory megakv wrote: nothing was changed")
    if not target.exists():
        os.replace(new, target)
        return
    old = target.with_name(f"{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old)
