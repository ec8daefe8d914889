"""The user's megakv cache directory: data downloads (megakv/data/fetch.py) and the native decode-attention
kernel builds (megakv/inference/native_attention.py) both live under it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$MEGAKV_CACHE; else $MEGAKV_CACHE_DIR (its older name); else $XDG_CACHE_HOME/megakv; else ~/.cache/megakv.
    An empty variable counts as unset."""
    for name in ("MEGAKV_CACHE", "MEGAKV_CACHE_DIR"):
        if os.environ.get(name):
            return Path(os.environ[name])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megakv"
