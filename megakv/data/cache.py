"""Hash-named on-disk cache of sample orders, built by one rank while the others wait.

An entry is a few `.npy` arrays named `{key}-{array}.npy` plus `{key}.json` (its human-readable
description, written last: the entry is complete once the json exists). The key is a hash of the
description, so a change of data, seed, seq_len or split can never pick up a stale entry. Every file is
written under a temporary name, flushed to disk and renamed, so readers never see a partial file; the
marker records each array's sha256, checked when the builder loads it (at each launch), since a crash can
still leave a renamed file zero-filled on some filesystems (training on such an order read the wrong
samples without an error).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np

from megakv.data.errors import DataError
from megakv.json_input import parse_json

CACHE_VERSION = 1


def cache_key(description: dict) -> str:
    text = json.dumps({"cache_version": CACHE_VERSION, **description}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _digest(array: np.ndarray) -> str:
    """sha256 of an array's values (its dtype and shape are in the .npy header numpy checks)."""
    return hashlib.sha256(memoryview(np.ascontiguousarray(array)).cast("B")).hexdigest()


class IndexCache:
    def __init__(self, directory: str | Path, verify: bool = True):
        """`verify`: check the arrays' checksums at each load (the builder does; every rank reading every entry
        whole at each launch would cost seconds per rank on large datasets, and the order stays memory-mapped)."""
        self.directory = Path(directory)
        self.verify = verify
        self.built = 0  # entries this process built (tests check that only the builder builds)

    def _marker(self, key: str) -> Path:
        return self.directory / f"{key}.json"

    def has(self, key: str) -> bool:
        return self._marker(key).exists()

    def load(self, key: str) -> dict[str, np.ndarray]:
        marker = self._marker(key)
        try:
            entry = parse_json(marker.read_text())
            arrays = {name: np.load(self.directory / f"{key}-{name}.npy", mmap_mode="r") for name in entry["arrays"]}
        except (OSError, ValueError, KeyError) as e:  # unreadable (permissions), truncated, not an entry
            raise DataError(f"cannot read the index cache entry {marker} ({type(e).__name__}: {e})",
                            self._rebuild_fix(key)) from None
        for name, digest in (entry.get("sha256", {}) if self.verify else {}).items():  # older entries: none
            if _digest(arrays[name]) != digest:
                raise DataError(f"the index cache file {self.directory / f'{key}-{name}.npy'} does not match the "
                                "checksum recorded when it was built (damaged, e.g. by a crash)",
                                self._rebuild_fix(key))
        return arrays

    def _rebuild_fix(self, key: str) -> str:
        return f"delete {self.directory}/{key}* (the next launch builds the entry again), or set data.cache_dir"

    def save(self, key: str, description: dict, arrays: dict[str, np.ndarray]) -> None:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            digests = {}
            for name, array in arrays.items():
                final = self.directory / f"{key}-{name}.npy"
                tmp = final.with_name(f"{final.name}.tmp-{uuid.uuid4().hex[:8]}")
                array = np.ascontiguousarray(array)
                with open(tmp, "wb") as f:
                    np.save(f, array)
                    f.flush()
                    os.fsync(f.fileno())
                tmp.replace(final)
                digests[name] = _digest(array)
            marker = self._marker(key)
            tmp = marker.with_name(f"{marker.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.write_text(json.dumps({**description, "arrays": list(arrays), "sha256": digests}, indent=2,
                                      sort_keys=True))
            tmp.replace(marker)
        except OSError as e:
            raise DataError(f"cannot write the index cache in {self.directory}: {e}",
                            "set data.cache_dir to a writable directory") from None
        self.built += 1

    def get_or_build(self, key: str, description: dict, build: Callable[[], dict[str, np.ndarray]],
                     may_build: bool) -> dict[str, np.ndarray] | None:
        """Load the entry; build and save it first if allowed; None if absent and not allowed."""
        if not self.has(key):
            if not may_build:
                return None
            self.save(key, description, build())
        return self.load(key)

    def wait_for(self, keys: list[str], timeout_s: float, poll_s: float = 0.5) -> None:
        """Poll until every entry exists (when there is no barrier to wait on)."""
        deadline = time.monotonic() + timeout_s
        while not all(self.has(k) for k in keys):
            if time.monotonic() > deadline:
                missing = [k for k in keys if not self.has(k)]
                raise DataError(f"gave up after {timeout_s:.0f} s waiting for {len(missing)} index cache entries "
                                f"in {self.directory} (e.g. {missing[0]})",
                                "make sure exactly one process builds (is_builder=True) and that "
                                "data.cache_dir is on a filesystem every process sees")
            time.sleep(poll_s)
