"""Whether a torch device named by the user exists on this machine, asked before anything is loaded onto it."""

from __future__ import annotations

import torch

from megakv.config.errors import ConfigError


def device_problem(name: str) -> str | None:
    """Why `name` (cpu, cuda, cuda:1, ...; `auto` always works) cannot be used here, or None if it can."""
    if name == "auto":
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as e:
        return f"not a torch device ({e})"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            return f"no CUDA GPU is available on this machine (torch {torch.__version__} is {build})"
        if device.index is not None and device.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s), there is no index {device.index}"
    elif device.type == "mps" and not torch.backends.mps.is_available():
        return "MPS is not available on this machine"
    return None


def resolve_device(name: str) -> str:
    """`auto` -> cuda when a GPU is available, else cpu; any other name unchanged."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def check_device(field: str, name: str, fix: str) -> None:
    """Raise ConfigError naming `field` when the device cannot be used on this machine."""
    problem = device_problem(name)
    if problem is not None:
        raise ConfigError(field, name, problem, fix)
