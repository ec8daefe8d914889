"""The megakv half of a checkpoint: where training stands, what it was trained on, and with what layout."""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "megakv_state.json"
RNG_DIR = "rng"
FORMAT_VERSION = 1


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed (including skipped ones); the next step's index
    consumed_samples: int = 0  # training sequences consumed: the loader continues from here
    tokens: int = 0
    skipped_steps: int = 0  # steps whose update was skipped because the loss/gradients were non-finite
    nonfinite_in_a_row: int = 0
    data_fingerprint: str = ""
    routing_seed: int = 0
    layout: dict = field(default_factory=dict)  # world size, data/tensor/pipeline sizes, ZeRO stage
    config_yaml: str = ""  # the resolved config of the run that wrote the checkpoint
    format: int = FORMAT_VERSION

    @property
    def data_parallel(self) -> int:
        return int(self.layout.get("data_parallel", 0))

    def write(self, directory: Path) -> None:
        tmp = directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(directory / STATE_FILE)

    @classmethod
    def read(cls, directory: Path) -> TrainState:
        raw = json.loads((Path(directory) / STATE_FILE).read_text())
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rng_file(directory: Path, rank: int) -> Path:
    return Path(directory) / RNG_DIR / f"rank{rank:05d}.pt"
