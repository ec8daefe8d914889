"""One cache root for the data downloads and the native kernel builds, and the variable that moves it."""

from __future__ import annotations

import pytest

from megakv.user_cache import cache_root

VARIABLES = ("MEGAKV_CACHE", "MEGAKV_CACHE_DIR", "XDG_CACHE_HOME")


@pytest.fixture
def env(monkeypatch, tmp_path):
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    return monkeypatch


def test_megakv_cache_alone_moves_it(env, tmp_path):
    """Other variables (XDG_CACHE_HOME, the kernels' former MEGAKV_CACHE_DIR) do not move it: a root that moved
    with them would leave a user's existing downloads behind."""
    assert cache_root() == tmp_path / "home" / ".cache" / "megakv"
    env.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    env.setenv("MEGAKV_CACHE_DIR", str(tmp_path / "older"))
    assert cache_root() == tmp_path / "home" / ".cache" / "megakv"
    env.setenv("MEGAKV_CACHE", str(tmp_path / "cache"))
    assert cache_root() == tmp_path / "cache"
    env.setenv("MEGAKV_CACHE", "")
    assert cache_root() == tmp_path / "home" / ".cache" / "megakv"


def test_the_downloads_and_the_kernel_builds_share_it(env, tmp_path):
    """The kernel builds went to $XDG_CACHE_HOME/megakv while the downloads ignored it: both follow $MEGAKV_CACHE."""
    import megakv.data.fetch as fetch
    import megakv.inference.native_attention as native

    env.setenv("MEGAKV_CACHE", str(tmp_path / "xdg" / "megakv"))
    assert fetch.cache_root() == native.cache_root() == tmp_path / "xdg" / "megakv"
    failing = tmp_path / "failing-cc"  # a "compiler" that fails every build: only where its records go matters
    failing.write_text("#!/bin/sh\necho 'no such flag' >&2\nexit 1\n")
    failing.chmod(0o755)
    env.setenv("CC", str(failing))
    assert native.build_library() is None
    assert any((tmp_path / "xdg" / "megakv" / "kernels").glob("*.failed"))
