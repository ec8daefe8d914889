"""Optimizer parameter groups and learning-rate schedules: below both training and parallel wrapping."""
