"""The megakv half of a checkpoint: where training stands, what it was trained on, and with what layout.

Everything here is JSON (the RNG streams too), so a checkpoint someone sent you cannot carry code in it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

STATE_FILE = "megakv_state.json"
RNG_DIR = "rng"
FORMAT_VERSION = 2  # 2: `files` manifest (size + sha256 per file), `run_id`, RNG streams as JSON


class StateFileError(ValueError):
    """A megakv_state.json that cannot be read; the message names the file."""


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed (including skipped ones); the next step's index
    consumed_samples: int = 0  # training sequences consumed: the loader continues from here
    tokens: int = 0
    skipped_steps: int = 0  # steps whose update was skipped because the loss/gradients were non-finite
    nonfinite_in_a_row: int = 0
    data_fingerprint: str = ""
    loss_mask_fingerprint: str = ""  # Data.loss_mask_fingerprint ("" without masks, or written before 2026-12-08)
    routing_seed: int = 0
    layout: dict = field(default_factory=dict)  # world size, data/tensor/pipeline sizes, ZeRO stage
    config_yaml: str = ""  # the resolved config of the run that wrote the checkpoint
    # Which run wrote it: set when a run starts fresh, carried over by every resume. A run only prunes
    # checkpoints with its own run_id.
    run_id: str = ""
    # Every other file of the checkpoint directory (relative path -> [size in bytes, sha256 hex]).
    files: dict = field(default_factory=dict)
    format: int = FORMAT_VERSION
    # A universal conversion: the `manifest_digest` of the checkpoint it was made from ("" otherwise, or
    # made before 2026-12-08), so a step saved again after the conversion is not resumed from the old one.
    converted_from: str = ""

    def manifest_digest(self) -> str:
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()[:24]

    @property
    def data_parallel(self) -> int:
        return int(self.layout.get("data_parallel", 0))

    def write(self, directory: Path) -> None:
        tmp = Path(directory) / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        tmp.replace(Path(directory) / STATE_FILE)

    @classmethod
    def read(cls, directory: Path) -> TrainState:
        path = Path(directory) / STATE_FILE
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StateFileError(f"{path} cannot be read ({e})") from None
        if not isinstance(raw, dict) or not isinstance(raw.get("step"), int):
            raise StateFileError(f"{path} is not a megakv train state (no integer 'step')")
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def _bytes(tensor: torch.Tensor) -> str:
    return base64.b64encode(tensor.numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng() -> dict:
    """Every RNG stream of this process as plain JSON values."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(internal), gauss],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _bytes(torch.get_rng_state())}
    if torch.cuda.is_available():  # this rank's GPU only: a resume may see fewer GPUs per process
        state["cuda"] = _bytes(torch.cuda.get_rng_state(torch.cuda.current_device()))
    return state


def restore_rng(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"]
        if isinstance(saved, list):  # checkpoints before 2026-12-07 saved every visible GPU's state
            saved = saved[min(torch.cuda.current_device(), len(saved) - 1)] if saved else None
        if saved is not None:
            torch.cuda.set_rng_state(_tensor(saved), torch.cuda.current_device())


def write_rng(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(capture_rng()))


def read_rng(path: Path) -> dict:
    """This rank's RNG streams; a legacy rng/rank*.pt goes through the weights-only unpickler."""
    if path.suffix == ".json":
        try:
            return json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StateFileError(f"{path} cannot be read ({e})") from None
    from megakv.safe_load import load_weights_only, numpy_globals

    legacy = load_weights_only(path, numpy_globals())
    name, keys, pos, has_gauss, cached = legacy["numpy"]
    version, internal, gauss = legacy["python"]
    return {"python": [version, list(internal), gauss],
            "numpy": [name, np.asarray(keys).tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": _bytes(legacy["torch"]),
            **({"cuda": [_bytes(s) for s in legacy["cuda"]]} if "cuda" in legacy else {})}


def rng_file(directory: Path, rank: int) -> Path:
    return Path(directory) / RNG_DIR / f"rank{rank:05d}.json"


def legacy_rng_file(directory: Path, rank: int) -> Path:
    return Path(directory) / RNG_DIR / f"rank{rank:05d}.pt"
