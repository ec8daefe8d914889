"""Moved to megakv/optim/schedule.py (below both train and parallel); kept for existing imports."""

from megakv.optim.schedule import (
    WarmupCosineSchedule,
    decay_horizon,
    lr_at,
    resume_schedule_notice,
    saved_schedule,
    schedule_change,
)

__all__ = ["WarmupCosineSchedule", "decay_horizon", "lr_at", "resume_schedule_notice", "saved_schedule",
           "schedule_change"]
