"""Learning rate: linear warm-up, then cosine decay (or constant), as a pure function of the step."""

from __future__ import annotations

import math

from megakv.config.optim import OptimConfig


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based); the first step already has a non-zero rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    decay_steps = max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineSchedule:
    """A scheduler object for DeepSpeed's engine: it calls step() after every applied optimizer step and
    saves/loads state_dict() with the checkpoint, so the schedule resumes exactly."""

    def __init__(self, optimizer, cfg: OptimConfig, total_steps: int):
        self.optimizer, self.cfg, self.total_steps = optimizer, cfg, total_steps
        self.steps_applied = 0
        self._apply()

    def _apply(self) -> None:
        lr = lr_at(self.steps_applied, self.cfg, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.steps_applied += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"steps_applied": self.steps_applied}

    def load_state_dict(self, state: dict) -> None:
        self.steps_applied = int(state["steps_applied"])
        self._apply()
