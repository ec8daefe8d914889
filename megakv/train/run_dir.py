"""The files of a run directory, in one place."""

from __future__ import annotations

import json
from pathlib import Path

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


def write_json_atomically(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(path)


def write_status(run_dir: str | Path, state: str, **details) -> None:
    """status.json: running | finished | preempted | diverged, for schedulers and humans."""
    write_json_atomically(Path(run_dir) / STATUS, {"state": state, **details})


def read_status(run_dir: str | Path) -> dict | None:
    path = Path(run_dir) / STATUS
    return json.loads(path.read_text()) if path.is_file() else None
