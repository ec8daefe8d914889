"""Optimizer and learning-rate schedule (the `optim:` section): AdamW, warm-up then cosine decay."""

from __future__ import annotations

from dataclasses import dataclass

from megakv.config.errors import ConfigError

SCHEDULES = ("cosine", "constant")


@dataclass
class OptimConfig:
    lr: float = 3e-4  # peak learning rate, reached at the end of warm-up
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    warmup_steps: int = 100  # linear warm-up from lr / warmup_steps to lr
    schedule: str = "cosine"  # cosine | constant (after warm-up)
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

        need(self.lr > 0, "lr", "must be positive", "typical values: 1e-4 .. 3e-3")
        need(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", "must lie in [0, 1]", "e.g. 0.1")
        need(self.warmup_steps >= 0, "warmup_steps", "must be >= 0", "e.g. 5% of train.steps")
        need(self.schedule in SCHEDULES, "schedule", f"unknown schedule, expected one of {SCHEDULES}",
             "use cosine")
        need(0.0 <= self.beta1 < 1.0, "beta1", "must lie in [0, 1)", "e.g. 0.9")
        need(0.0 <= self.beta2 < 1.0, "beta2", "must lie in [0, 1)", "e.g. 0.95 or 0.99")
        need(self.eps > 0, "eps", "must be positive", "e.g. 1e-8")
        need(self.weight_decay >= 0, "weight_decay", "must be >= 0", "e.g. 0.1")
        need(self.grad_clip >= 0, "grad_clip", "must be >= 0", "0 disables clipping; the paper uses 0.1")
