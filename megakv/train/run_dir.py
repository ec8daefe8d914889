"""The files of a run directory, in one place."""

from __future__ import annotations

import json
from pathlib import Path

from megakv.json_input import parse_json

CONFIG = "config.yaml"
DS_CONFIG = "ds_config.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tensorboard"
LOGS = "logs"
TOKENIZER = "tokenizer"
METRICS = "metrics.jsonl"
STATUS = "status.json"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


LINK_PROBLEM = ("a run directory holds no links (megakv writes none), and one in a run directory you received "
                "could make a launch or a conversion write through it to any file you can write")
LINK_FIX = ("remove the link; to keep checkpoints on another filesystem, put the whole train.run_dir there (the run "
            "directory itself may be a link)")


class RunDirWriteError(OSError):
    """A run-directory file (metrics, status) could not be written: said plainly, not as a traceback."""

    def __init__(self, path: Path, error: OSError):
        super().__init__(error.errno, f"cannot write {path} ({error.strerror or error}): the disk holding the run "
                         "directory may be full or over quota; the last complete checkpoint is untouched. Fix: "
                         "free space, then resume with --resume auto")


def write_json_atomically(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
        tmp.replace(path)
    except OSError as e:  # a full disk: said plainly, and no half-written .tmp left behind
        tmp.unlink(missing_ok=True)
        raise RunDirWriteError(path, e) from e


def write_status(run_dir: str | Path, state: str, **details) -> None:
    """status.json: running | finished | preempted | diverged, for schedulers and humans."""
    write_json_atomically(Path(run_dir) / STATUS, {"state": state, **details})


def read_status(run_dir: str | Path) -> dict | None:
    """None when there is none, or none readable (a crash can leave it empty or zero-filled)."""
    path = Path(run_dir) / STATUS
    try:
        status = parse_json(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None
