"""Learning rate as a pure function of the step: linear warm-up, then cosine decay, a constant rate, or
warmup-stable-decay (WSD), reaching the floor at `optim.decay_steps` (default: train.steps)."""

from __future__ import annotations

import math

from megakv.config.optim import OptimConfig

SAMPLED_STEPS = 200  # steps compared when telling whether a resumed run's schedule changed


def decay_horizon(cfg: OptimConfig, total_steps: int) -> int:
    """The step at which the decay reaches lr * min_lr_ratio (Megatron's --lr-decay-iters)."""
    return cfg.decay_steps if cfg.decay_steps is not None else total_steps


def _decayed(progress: float, style: str) -> float:
    """Fraction of the way from the peak (1) to the floor (0) still left at `progress` in [0, 1]."""
    if style == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if style == "minus_sqrt":
        return 1.0 - math.sqrt(progress)
    return 1.0 - progress  # linear


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based); the first step already has a non-zero rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    horizon = decay_horizon(cfg, total_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":
        decay_start = max(cfg.warmup_steps, horizon - cfg.wsd_decay_steps)
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start) / max(1, horizon - decay_start))
        return floor + (cfg.lr - floor) * _decayed(progress, cfg.wsd_decay_style)
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, horizon - cfg.warmup_steps))
    return floor + (cfg.lr - floor) * _decayed(progress, "cosine")


def schedule_change(saved: OptimConfig, saved_steps: int, current: OptimConfig, current_steps: int,
                    steps_applied: int) -> str | None:
    """A sentence for the log when a resumed run continues on another schedule than it was trained on, or
    None. `steps_applied`: optimizer steps already taken (the schedule skips non-finite steps)."""
    end = max(decay_horizon(saved, saved_steps), decay_horizon(current, current_steps), steps_applied + 1)
    stride = max(1, (end - steps_applied) // SAMPLED_STEPS)
    differs = [s for s in range(steps_applied, end + 1, stride)
               if not math.isclose(lr_at(s, saved, saved_steps), lr_at(s, current, current_steps), rel_tol=1e-9)]
    if not differs:
        return None
    old_horizon, new_horizon = decay_horizon(saved, saved_steps), decay_horizon(current, current_steps)
    step = differs[0]
    text = (f"resuming on a different learning-rate schedule: from step {step + 1} the rate is "
            f"{lr_at(step, current, current_steps):.3e} where the checkpoint's schedule gives "
            f"{lr_at(step, saved, saved_steps):.3e}")
    if old_horizon != new_horizon:
        text += (f" (decay horizon {old_horizon} -> {new_horizon} steps); to keep the old decay set "
                 f"optim.decay_steps={old_horizon}")
    return text


def saved_schedule(config_yaml: str) -> tuple[OptimConfig, int] | None:
    """(optim section, train.steps) of a run's saved config.yaml text; None if it cannot be read."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        saved = OmegaConf.create(config_yaml)
        optim = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(OptimConfig), saved.get("optim", {})))
        return optim, int(saved.train.steps)
    except (OmegaConfBaseException, AttributeError, TypeError, ValueError):
        return None


def resume_schedule_notice(saved_config_yaml: str, cfg, steps_applied: int) -> str | None:
    """schedule_change between a checkpoint's saved config (its config.yaml text) and `cfg` (MegaKVConfig)."""
    saved = saved_schedule(saved_config_yaml)
    if saved is None:
        return None
    return schedule_change(saved[0], saved[1], cfg.optim, cfg.train.steps, steps_applied)


class WarmupCosineSchedule:
    """A scheduler object for DeepSpeed's engine: it calls step() after every applied optimizer step and
    saves/loads state_dict() with the checkpoint, so the schedule resumes exactly. (Every schedule of
    `lr_at`, despite the name.)"""

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

    def reapply(self) -> None:
        """Set the schedule's rate again, e.g. after a checkpoint restored the optimizer's old param groups."""
        self._apply()

    def state_dict(self) -> dict:
        return {"steps_applied": self.steps_applied}

    def load_state_dict(self, state: dict) -> None:
        self.steps_applied = int(state["steps_applied"])
        self._apply()
