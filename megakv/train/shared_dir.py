"""Every rank must see one run directory: checkpoints are written into it by all ranks and completed by rank 0.

On several nodes with train.run_dir on node-local storage (/tmp, $TMPDIR, a local scratch disk) each node gets
its own copy: training runs, but every checkpoint is split across nodes and none can be resumed. Checked once
at launch, before anything is trained: rank 0 writes a fresh token into the directory and every rank reads it.
"""

from __future__ import annotations

import os
import secrets
import socket
from pathlib import Path

import torch.distributed as dist

from megakv.config.errors import ConfigError

PROBE = ".megakv-shared-check"


def _reads_token(probe: Path, token: str) -> bool:
    try:
        return probe.read_text() == token
    except OSError:
        return False


def check_run_dir_shared(run_dir: Path, rank: int) -> None:
    """Raise ConfigError on every rank when some rank does not see what rank 0 wrote into `run_dir`."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    probe = Path(run_dir) / PROBE
    token = [secrets.token_hex(16) if rank == 0 else None]
    dist.broadcast_object_list(token, src=0)
    if rank == 0:
        tmp = probe.with_name(f"{PROBE}.{os.getpid()}")
        tmp.write_text(token[0])
        tmp.replace(probe)  # whole or absent: a rank never reads half a token
    dist.barrier()
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, (_reads_token(probe, token[0]), socket.gethostname()))
    dist.barrier()  # everyone has read it
    if rank == 0:
        probe.unlink(missing_ok=True)
    blind = [(r, host) for r, (ok, host) in enumerate(seen) if not ok]
    if blind:
        hosts = sorted({host for _, host in blind})
        raise ConfigError(
            "train.run_dir", str(run_dir),
            f"it is not the same directory on every node: rank(s) {', '.join(str(r) for r, _ in blind)} (on "
            f"{', '.join(hosts)}) do not see the file rank 0 (on {seen[0][1]}) wrote there. Every rank writes its "
            "checkpoint shards into it, so checkpoints would be split across nodes and could not be resumed",
            "put train.run_dir on a filesystem all nodes share (a home or project directory, Lustre, GPFS, NFS), "
            "not node-local /tmp, $TMPDIR or a local scratch disk")

__all__ = ["PROBE", "check_run_dir_shared"]
