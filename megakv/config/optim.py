"""Optimizer and learning-rate schedule (the `optim:` section): AdamW, warm-up then cosine decay, a
constant rate, or warmup-stable-decay (WSD); the decay horizon may differ from the run's length."""

from __future__ import annotations

import math
from dataclasses import dataclass

from megakv.config.errors import ConfigError

SCHEDULES = ("cosine", "constant", "wsd")
WSD_DECAY_STYLES = ("linear", "cosine", "minus_sqrt")


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate, reached at the end of warm-up
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio (and stays there)
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps to lr
    schedule: str = "cosine"  # cosine | constant (after warm-up) | wsd (warm-up, stable, decay)
    # Step at which the decay reaches the floor, as Megatron's --lr-decay-iters; None: train.steps. Set
    # it to keep the schedule when a run is extended (train.steps raised on resume).
    decay_steps: int | None = None
    # wsd: the final decay phase lasts this many steps and ends at decay_steps (or train.steps).
    wsd_decay_steps: int = 0
    wsd_decay_style: str = "linear"  # linear | cosine | minus_sqrt (1 - sqrt of progress)
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to matrices only; norms and biases are never decayed
    decay_embeddings: bool = True  # whether the embedding (and a tied output) matrix is decayed
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping (always written explicitly)

    def validate(self, prefix: str = "optim") -> None:
        def need(ok: bool, name: str, problem: str, fix: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), problem, fix)

        for name in ("lr", "min_lr_ratio", "beta1", "beta2", "eps", "weight_decay", "grad_clip"):
            need(math.isfinite(getattr(self, name)), name, "must be a finite number", "give a finite value")
        need(self.lr > 0, "lr", "must be positive", "typical values: 1e-4 .. 3e-3")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must lie in [0, 1]", "e.g. 0.1")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0", "e.g. 5% of train.steps")
        need(self.schedule in SCHEDULES, "schedule", f"unknown schedule, expected one of {SCHEDULES}",
             "use cosine")
        need(self.decay_steps is None or self.decay_steps > self.warmup_steps, "decay_steps",
             f"must exceed optim.warmup_steps={self.warmup_steps}", "null for train.steps, or a later step")
        need(self.wsd_decay_style in WSD_DECAY_STYLES, "wsd_decay_style", f"expected one of {WSD_DECAY_STYLES}",
             "use linear")
        need(self.wsd_decay_steps >= 0, "wsd_decay_steps", "must be >= 0", "e.g. 10-20% of the run")
        need(self.schedule != "wsd" or self.wsd_decay_steps > 0, "wsd_decay_steps",
             "must be positive with optim.schedule=wsd", "e.g. 10-20% of the run")
        need(0.0 <= self.beta1 < 1.0, "beta1", "must lie in [0, 1)", "e.g. 0.9")
        need(0.0 <= self.beta2 < 1.0, "beta2", "must lie in [0, 1)", "e.g. 0.95 or 0.99")
        need(self.eps > 0, "eps", "must be positive", "e.g. 1e-8")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0", "e.g. 0.1")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0", "0 disables clipping; the paper uses 0.1")
