"""Scalars for TensorBoard and a machine-readable metrics.jsonl, written by the rank holding the loss."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from megakv.routing import RoutingPlan
from megakv.train.run_dir import RunDirWriteError


def routing_scalars(plans: list[RoutingPlan]) -> dict[str, float]:
    """Fraction of routed layers and the mean source distance of each layer, averaged over the step's plans."""
    n_layers = plans[0].n_layers
    out = {"routing/routed_fraction": sum(p.routed_fraction for p in plans) / len(plans)}
    distances = [sum(p.distances()[layer] for p in plans) / len(plans) for layer in range(n_layers)]
    out["routing/mean_distance"] = sum(distances) / n_layers
    for layer in range(1, n_layers):
        out[f"routing/distance/layer_{layer:02d}"] = distances[layer]
    return out


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def drop_records_after(metrics_file: Path, step: int) -> int:
    """Before a run continues from `step`: remove the records of later steps (written by a run that crashed
    or stopped after its last checkpoint), so the file holds each step once. Returns how many were dropped."""
    metrics_file = Path(metrics_file)
    if not metrics_file.is_file():
        return 0
    kept, dropped = [], 0
    for raw in metrics_file.read_bytes().splitlines():
        try:
            line = raw.decode("utf-8")
            record_step = json.loads(line).get("step", 0)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            dropped += 1  # a line cut short by a crash (mid-character, even), or damaged
            continue
        if isinstance(record_step, int) and record_step > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = metrics_file.with_name(metrics_file.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(metrics_file)
    return dropped


class MetricsWriter:
    def __init__(self, metrics_file: Path, tensorboard_dir: Path | None, first_step: int = 1):
        """first_step: the step this launch runs first. TensorBoard hides the events an earlier launch wrote for
        it and later steps (run past its last checkpoint, then resumed), as metrics.jsonl drops them."""
        self.file = open(metrics_file, "a", buffering=1)
        self.tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(tensorboard_dir), purge_step=first_step)

    def write(self, step: int, scalars: dict[str, float], **extra) -> None:
        record = {"step": step, "time": time.time(), **scalars, **extra}
        try:
            self.file.write(json.dumps(record) + "\n")
        except OSError as e:
            raise RunDirWriteError(Path(self.file.name), e) from e
        if self.tb is not None:
            for name, value in scalars.items():
                if value is not None:
                    self.tb.add_scalar(name, value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
