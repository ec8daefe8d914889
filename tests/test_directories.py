"""megakv/directories.py: a directory replaced by a freshly written one is never missing while the old is deleted."""

from __future__ import annotations

import os

import pytest

import megakv.directories as directories
from megakv.directories import replace_directory


def _dir(path, text: str):
    path.mkdir()
    (path / "file").write_text(text)
    return path


def test_the_new_directory_is_in_place_before_the_old_one_is_deleted(tmp_path, monkeypatch):
    target, new = _dir(tmp_path / "out", "old"), _dir(tmp_path / "out.tmp", "new")
    deleting = []
    real_rmtree = directories.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        deleting.append((path.name, (target / "file").read_text()))  # what readers of `target` see meanwhile
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(directories.shutil, "rmtree", rmtree)
    replace_directory(new, target)
    assert (target / "file").read_text() == "new"
    assert len(deleting) == 1 and deleting[0][0].startswith("out.old-") and deleting[0][1] == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it


def test_a_missing_target_is_created(tmp_path):
    replace_directory(_dir(tmp_path / "out.tmp", "new"), tmp_path / "out")
    assert (tmp_path / "out" / "file").read_text() == "new" and not (tmp_path / "out.tmp").exists()


def test_a_failed_rename_puts_the_old_directory_back(tmp_path, monkeypatch):
    target, new = _dir(tmp_path / "out", "old"), _dir(tmp_path / "out.tmp", "new")
    real_rename = os.rename

    def rename(src, dst):
        if os.fspath(src) == os.fspath(new):
            raise OSError("disk gone")
        real_rename(src, dst)

    monkeypatch.setattr(directories.os, "rename", rename)
    with pytest.raises(OSError, match="disk gone"):
        replace_directory(new, target)
    assert (target / "file").read_text() == "old" and (new / "file").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "out.tmp"]


def test_a_link_or_file_target_is_refused_before_anything_moves(tmp_path):
    """A symlinked target was swapped for a real directory, a stray .old-* link left, and the call still failed."""
    from megakv.directories import replace_directory

    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "out"
    link.symlink_to(real)
    new = tmp_path / "new"
    new.mkdir()
    with pytest.raises(NotADirectoryError, match="nothing was changed"):
        replace_directory(new, link)
    assert link.is_symlink() and new.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["new", "out", "real"]
