"""Checkpoints = DeepSpeed's sharded save_checkpoint + the megakv TrainState, committed atomically.

Layout of RUN_DIR/checkpoints/:
    step_00000400/              a complete checkpoint (DeepSpeed shards, megakv_state.json, rng/rank*.pt)
    step_00000400_universal/    the same, converted for another data-parallel size (megakv-convert to-universal)
    latest                      the tag of the newest complete checkpoint; written last
    latest_universal            the tag of the newest universal conversion
    .tmp-step_00000500/         a save in progress (or one a crash interrupted; removed by the next save)

Every rank writes its shards under the temporary tag; after a barrier rank 0 renames the directory and
then replaces `latest` (write + rename), so a crash at any point leaves `latest` naming a complete one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megakv.train.state import RNG_DIR, STATE_FILE, TrainState, capture_rng, rng_file

log = logging.getLogger("megakv.checkpoint")

LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"
TMP_PREFIX = ".tmp-"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
# ds_to_universal requires this key in ZeRO-1/2 checkpoints; megakv has no tensor-parallel merge patterns.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def universal_tag(tag: str) -> str:
    return f"{tag}_universal"


def read_pointer(ckpt_dir: Path, name: str = LATEST) -> str | None:
    path = Path(ckpt_dir) / name
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag or None


def write_pointer(ckpt_dir: Path, tag: str, name: str = LATEST) -> None:
    tmp = Path(ckpt_dir) / f"{TMP_PREFIX}{name}"
    with open(tmp, "w") as f:
        f.write(tag + "\n")
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(Path(ckpt_dir) / name)
    _fsync_dir(ckpt_dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(tag_dir: Path) -> bool:
    return (Path(tag_dir) / STATE_FILE).is_file()


def complete_tags(ckpt_dir: Path) -> list[str]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if TAG_PATTERN.match(p.name) and is_complete(p)]
    return sorted(tags)


@dataclass(frozen=True)
class ResumePoint:
    ckpt_dir: Path
    tag: str  # the tag DeepSpeed loads (the universal one when resuming on another data-parallel size)
    state: TrainState
    universal: bool

    @property
    def path(self) -> Path:
        return self.ckpt_dir / self.tag


def latest_checkpoint(ckpt_dir: Path) -> tuple[str, TrainState] | None:
    """The newest complete checkpoint per `latest`; None when the run has none."""
    tag = read_pointer(ckpt_dir)
    if tag is None:
        return None
    if not is_complete(Path(ckpt_dir) / tag):
        raise RuntimeError(f"{Path(ckpt_dir) / LATEST} names {tag}, which is incomplete or missing; "
                           f"point it at a complete step_* directory (one holding {STATE_FILE})")
    return tag, TrainState.read(Path(ckpt_dir) / tag)


class CheckpointManager:
    def __init__(self, ckpt_dir: Path, rank: int, keep_last: int, sigkill_while_saving_step: int = -1):
        self.ckpt_dir, self.rank, self.keep_last = Path(ckpt_dir), rank, keep_last
        self.sigkill_while_saving_step = sigkill_while_saving_step
        self.last_saved_step: int | None = None

    def save(self, engine, state: TrainState) -> str:
        tag = tag_for(state.step)
        tmp_tag = TMP_PREFIX + tag
        tmp_dir = self.ckpt_dir / tmp_tag
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self._remove_stale_partials()
        dist.barrier()
        engine.save_checkpoint(str(self.ckpt_dir), tag=tmp_tag, client_state=dict(UNIVERSAL_INFO),
                               save_latest=False)
        rng_path = rng_file(tmp_dir, self.rank)
        rng_path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(capture_rng(), rng_path)
        if self.rank == 0:
            if state.step == self.sigkill_while_saving_step:  # fault injection for the crash-safety test
                log.warning("fault injection: SIGKILL while saving %s", tag)
                os.kill(os.getpid(), signal.SIGKILL)
            state.write(tmp_dir)  # the completeness marker, written after this rank's shards
        dist.barrier()  # every rank's shards are on disk
        if self.rank == 0:
            final = self.ckpt_dir / tag
            if final.exists():  # the same step saved again (e.g. by a restarted run): replace it
                shutil.rmtree(final)
            tmp_dir.rename(final)
            _fsync_dir(self.ckpt_dir)
            write_pointer(self.ckpt_dir, tag)
            self._prune(keep=tag)
            log.info("saved checkpoint %s", final)
        dist.barrier()
        self.last_saved_step = state.step
        return tag

    def _remove_stale_partials(self) -> None:
        for path in self.ckpt_dir.glob(TMP_PREFIX + "*"):
            if path.is_dir():
                log.warning("removing %s, left by an interrupted save", path)
                shutil.rmtree(path, ignore_errors=True)

    def _prune(self, keep: str) -> None:
        tags = complete_tags(self.ckpt_dir)
        for old in tags[:-self.keep_last]:
            if old == keep:
                continue
            shutil.rmtree(self.ckpt_dir / old, ignore_errors=True)
            shutil.rmtree(self.ckpt_dir / universal_tag(old), ignore_errors=True)
            log.info("removed old checkpoint %s (keep_last=%d)", old, self.keep_last)


def load_checkpoint(engine, point: ResumePoint, rank: int) -> None:
    """DeepSpeed state (weights, optimizer, LR schedule) and this rank's RNG streams."""
    from megakv.train.state import restore_rng

    load_path, _ = engine.load_checkpoint(str(point.ckpt_dir), tag=point.tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {point.path}")
    rng_path = rng_file(point.path, rank)
    if rng_path.is_file():
        restore_rng(torch.load(rng_path, weights_only=False))
    else:  # a different number of ranks: this rank had no predecessor; the model itself draws no randomness
        log.info("no RNG state for rank %d in %s; keeping the seeded streams", rank, point.path)


__all__ = ["CheckpointManager", "LATEST", "LATEST_UNIVERSAL", "RNG_DIR", "ResumePoint", "complete_tags",
           "latest_checkpoint", "load_checkpoint", "read_pointer", "tag_for", "universal_tag", "write_pointer"]
