"""Checkpoints = DeepSpeed's sharded save_checkpoint + the megakv TrainState, committed atomically.

Layout of RUN_DIR/checkpoints/:
    step_00000400/              a complete checkpoint (DeepSpeed shards, rng/rank*.json, megakv_state.json)
    step_00000400_universal/    the same, converted for another data-parallel / pipeline layout (megakv-convert
                                to-universal; parameters under MegaKVModel names: megakv/parallel/universal.py)
    latest                      the tag of the newest complete checkpoint; written last (a hint for tools)
    latest_universal            the tag of the newest universal conversion
    .tmp-step_00000500/         a save in progress (or one a crash interrupted; removed at the next start)
    step_00000500.superseded-*  a damaged checkpoint a resumed run saved over; kept, never read or pruned

Every rank writes its shards under the temporary tag; after a barrier the ranks checksum the files and
rank 0 writes the completeness marker (megakv_state.json, with each file's size and sha256), renames the
directory and then replaces `latest`. A `step_*` directory holding the marker is therefore complete, and
resuming picks the newest one whose files still match their checksums, whatever `latest` says.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.distributed as dist

from megakv.train.state import (
    RNG_DIR,
    STATE_FILE,
    StateFileError,
    TrainState,
    legacy_rng_file,
    read_rng,
    restore_rng,
    rng_file,
    write_rng,
)

log = logging.getLogger("megakv.checkpoint")

LATEST = "latest"
LATEST_UNIVERSAL = "latest_universal"
TMP_PREFIX = ".tmp-"
SUPERSEDED = ".superseded-"
TAG_PATTERN = re.compile(r"^step_(\d{8})$")
# ds_to_universal requires this key in ZeRO-1/2 checkpoints; megakv has no tensor-parallel merge patterns.
UNIVERSAL_INFO = {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}}
LOW_DISK_BYTES = 64 << 20  # below this much free space a failed save is reported as a full disk


class CheckpointError(ValueError):
    """A checkpoint that cannot be used or written; the message names the file and the fix."""


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def universal_tag(tag: str) -> str:
    return f"{tag}_universal"


def read_pointer(ckpt_dir: Path, name: str = LATEST) -> str | None:
    path = Path(ckpt_dir) / name
    if not path.is_file():
        return None
    try:
        tag = path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
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


# ----------------------------------------------------------------------------- the manifest


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(tag_dir: Path) -> list[str]:
    """Every file of a checkpoint directory but the marker, as sorted relative paths."""
    tag_dir = Path(tag_dir)
    return sorted(str(p.relative_to(tag_dir)) for p in tag_dir.rglob("*")
                  if p.is_file() and not p.name.startswith(STATE_FILE))


def manifest_of(tag_dir: Path, names: list[str]) -> dict[str, list]:
    return {name: [(Path(tag_dir) / name).stat().st_size, file_digest(Path(tag_dir) / name)] for name in names}


def verify(tag_dir: Path, checksums: bool = True) -> str | None:
    """None when the checkpoint is intact; else what is wrong, naming the file."""
    tag_dir = Path(tag_dir)
    if not (tag_dir / STATE_FILE).is_file():
        return f"{tag_dir / STATE_FILE} is missing (the save never completed)"
    try:
        state = TrainState.read(tag_dir)
    except StateFileError as e:
        return str(e)
    for name, (size, digest) in state.files.items():
        if Path(name).is_absolute() or ".." in Path(name).parts or not name.isprintable():
            return f"{tag_dir / STATE_FILE} lists {name!r}, which is not a file name inside the checkpoint"
        path = tag_dir / name
        if not path.is_file():
            return f"{path} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{path} has {actual} bytes, {size} were written (truncated or replaced)"
        if checksums and file_digest(path) != digest:
            return f"{path} does not match the checksum recorded when it was written (corrupted)"
    return None


# ----------------------------------------------------------------------------- finding checkpoints


def step_tags(ckpt_dir: Path) -> list[str]:
    """Every step_* directory, complete or not, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if TAG_PATTERN.match(p.name) and p.is_dir())


def complete_tags(ckpt_dir: Path) -> list[str]:
    return [t for t in step_tags(ckpt_dir) if (Path(ckpt_dir) / t / STATE_FILE).is_file()]


def holds_checkpoints(ckpt_dir: Path) -> bool:
    return bool(step_tags(ckpt_dir)) or read_pointer(ckpt_dir) is not None


@dataclass
class Discovery:
    """The newest intact checkpoint of a directory and what was passed over on the way to it."""

    found: tuple[str, TrainState] | None
    damaged: list[str] = field(default_factory=list)  # one line per newer checkpoint that could not be used
    notes: list[str] = field(default_factory=list)  # e.g. `latest` missing or stale


def discover(ckpt_dir: Path, checksums: bool = True) -> Discovery:
    """Newest intact step_* directory. `latest` is only a hint: a missing, empty or stale pointer, or a
    damaged checkpoint it names, falls back to the newest checkpoint whose files match their manifest."""
    ckpt_dir = Path(ckpt_dir)
    result = Discovery(found=None)
    for tag in reversed(step_tags(ckpt_dir)):
        problem = verify(ckpt_dir / tag, checksums)
        if problem is None:
            result.found = (tag, TrainState.read(ckpt_dir / tag))
            break
        result.damaged.append(f"{tag}: {problem}")
    pointer = read_pointer(ckpt_dir)
    if result.found is not None and pointer != result.found[0]:
        said = "is missing or empty" if pointer is None else f"names {pointer}"
        result.notes.append(f"{ckpt_dir / LATEST} {said}; the newest intact checkpoint is {result.found[0]}")
    return result


def latest_checkpoint(ckpt_dir: Path) -> tuple[str, TrainState] | None:
    """The newest intact checkpoint; None when the directory holds none at all. Raises CheckpointError when
    it holds checkpoints but none is intact."""
    found = discover(ckpt_dir)
    if found.found is None and holds_checkpoints(ckpt_dir):
        raise CheckpointError(f"{ckpt_dir} holds checkpoints but none is intact: " + "; ".join(found.damaged)
                              + ". Fix: restore a good copy of one of them, or choose a new train.run_dir")
    return found.found


@dataclass(frozen=True)
class ResumePoint:
    ckpt_dir: Path
    tag: str  # the tag DeepSpeed loads (the universal one when resuming on another data-parallel size)
    state: TrainState
    universal: bool
    notices: tuple[str, ...] = ()  # damaged checkpoints passed over, a stale `latest`: print loudly, log
    config_changes: tuple[str, ...] = ()  # "field: before -> now" for each setting that differs

    @property
    def path(self) -> Path:
        return self.ckpt_dir / self.tag


def remove_partial_saves(ckpt_dir: Path) -> list[Path]:
    """Temporary directories of saves a crash interrupted; call before any rank starts a new save."""
    removed = []
    for path in Path(ckpt_dir).glob(TMP_PREFIX + "*"):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


# ----------------------------------------------------------------------------- saving


def _disk_full(error: BaseException, directory: Path) -> bool:
    chain = error
    while chain is not None:
        if isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        chain = chain.__cause__ or chain.__context__
    try:
        return shutil.disk_usage(directory).free < LOW_DISK_BYTES
    except OSError:
        return False


class CheckpointManager:
    def __init__(self, ckpt_dir: Path, rank: int, keep_last: int, sigkill_while_saving_step: int = -1,
                 run_id: str = ""):
        self.ckpt_dir, self.rank, self.keep_last = Path(ckpt_dir), rank, keep_last
        self.sigkill_while_saving_step = sigkill_while_saving_step
        self.run_id = run_id
        self.last_saved_step: int | None = None

    def save(self, engine, state: TrainState) -> str:
        tag = tag_for(state.step)
        tmp_dir = self.ckpt_dir / (TMP_PREFIX + tag)
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        dist.barrier()
        try:
            engine.save_checkpoint(str(self.ckpt_dir), tag=tmp_dir.name, client_state=dict(UNIVERSAL_INFO),
                                   save_latest=False)
            write_rng(rng_file(tmp_dir, self.rank))
        except Exception as e:
            if _disk_full(e, self.ckpt_dir):
                raise CheckpointError(
                    f"no space left (or a quota or file-size limit reached) on the device holding {self.ckpt_dir} "
                    f"while saving {tag} "
                    f"({type(e).__name__}: {e}); the last complete checkpoint is untouched and the partial "
                    f"{tmp_dir} is removed at the next start. Fix: free disk space (or lower checkpoint.keep_last, "
                    "or put train.run_dir on a larger disk), then --resume auto") from e
            raise
        dist.barrier()  # every rank's shards are on disk: checksum them, a share per rank
        names, world = checkpoint_files(tmp_dir), dist.get_world_size()
        mine = manifest_of(tmp_dir, names[self.rank::world])
        if world > 1:
            shares: list = [None] * world
            dist.all_gather_object(shares, mine)
        else:
            shares = [mine]
        if self.rank == 0:
            state.files = {name: share[name] for share in shares for name in share}
            state.run_id = self.run_id
            if state.step == self.sigkill_while_saving_step:  # fault injection for the crash-safety test
                log.warning("fault injection: SIGKILL while saving %s", tag)
                os.kill(os.getpid(), signal.SIGKILL)
            state.write(tmp_dir)  # the completeness marker, written once every file is on disk
            final = self.ckpt_dir / tag
            if final.exists():  # a damaged checkpoint the resume passed over: keep it aside, never delete it
                aside = final.with_name(f"{tag}{SUPERSEDED}{time.strftime('%Y%m%d-%H%M%S')}")
                final.rename(aside)
                log.warning("moved %s aside to %s (it could not be resumed from)", final, aside.name)
            tmp_dir.rename(final)
            _fsync_dir(self.ckpt_dir)
            write_pointer(self.ckpt_dir, tag)
            self._prune(keep=tag)
            log.info("saved checkpoint %s", final)
        dist.barrier()
        self.last_saved_step = state.step
        return tag

    def _prune(self, keep: str) -> None:
        """Delete this run's oldest complete checkpoints beyond keep_last; never another run's."""
        ours = []
        for tag in complete_tags(self.ckpt_dir):
            try:
                if TrainState.read(self.ckpt_dir / tag).run_id == self.run_id:
                    ours.append(tag)
            except StateFileError:
                continue
        for old in ours[:-self.keep_last]:
            if old == keep:
                continue
            shutil.rmtree(self.ckpt_dir / old, ignore_errors=True)
            shutil.rmtree(self.ckpt_dir / universal_tag(old), ignore_errors=True)
            log.info("removed old checkpoint %s (keep_last=%d)", old, self.keep_last)


def load_checkpoint(engine, point: ResumePoint, rank: int) -> None:
    """DeepSpeed state (weights, optimizer, LR schedule) and this rank's RNG streams. Every .pt file is first
    parsed by the weights-only unpickler (megakv.safe_load): DeepSpeed's own loader would run code in it."""
    from megakv.safe_load import check_deepspeed_dir, forced_weights_only

    check_deepspeed_dir(point.path)
    try:
        with forced_weights_only(point.path):  # DeepSpeed's loader unpickles with weights_only=False: a second guard
            if point.universal:  # MegaKVModel-named: the dense and the pipe engine each map their own names
                from megakv.parallel.universal import load_universal

                load_path, _ = load_universal(engine, point.ckpt_dir, point.tag, point.state.config_yaml)
            else:
                load_path, _ = engine.load_checkpoint(str(point.ckpt_dir), tag=point.tag,
                                                      load_optimizer_states=True, load_lr_scheduler_states=True)
    except FileNotFoundError as e:  # a shard its manifest does not list (the manifest's own files were checked)
        raise CheckpointError(f"checkpoint {point.path} lacks {e.filename}, a file this layout's DeepSpeed load "
                              "needs, although its manifest does not list it (an incomplete copy?). Fix: copy the "
                              "checkpoint again from where it was written, or move it aside to resume from the one "
                              "before") from None
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load checkpoint {point.path}. Fix: resume from another "
                              "checkpoint (move this one aside) or choose a new train.run_dir")
    for path in (rng_file(point.path, rank), legacy_rng_file(point.path, rank)):
        if path.is_file():
            restore_rng(read_rng(path))
            return
    # a different number of ranks: this rank had no predecessor; the model itself draws no randomness
    log.info("no RNG state for rank %d in %s; keeping the seeded streams", rank, point.path)


__all__ = ["CheckpointError", "CheckpointManager", "Discovery", "LATEST", "LATEST_UNIVERSAL", "RNG_DIR",
           "ResumePoint", "complete_tags", "discover", "holds_checkpoints", "latest_checkpoint", "load_checkpoint",
           "read_pointer", "remove_partial_saves", "tag_for", "universal_tag", "verify", "write_pointer"]
