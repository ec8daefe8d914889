"""Moved to megakv/optim/param_groups.py (below both train and parallel); kept for existing imports."""

from megakv.optim.param_groups import is_decayed, weight_decay_groups

__all__ = ["is_decayed", "weight_decay_groups"]
