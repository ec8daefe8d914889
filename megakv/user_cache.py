"""The user's megakv cache directory: data downloads (megakv/data/fetch.py) and the native decode-attention
kernel builds (megakv/inference/native_attention.py) both live under it."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$MEGAKV_CACHE, else ~/.cache/megakv (an empty variable counts as unset). The downloads' rule since
    they were added: a cache directory that moved with other variables would leave existing downloads behind
    (compute nodes without network could no longer build the corpora)."""
    return Path(os.environ.get("MEGAKV_CACHE") or Path.home() / ".cache" / "megakv")
