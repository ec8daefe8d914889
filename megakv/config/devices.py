"""Whether a torch device named by the user exists on this machine, asked before anything is loaded onto it."""

from __future__ import annotations

import os

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


def pinned_accelerator() -> str | None:
    """DeepSpeed's accelerator as the environment pins it (DS_ACCELERATOR); None: DeepSpeed picks CUDA whenever
    torch sees a GPU."""
    return os.environ.get("DS_ACCELERATOR") or None


def device_type(requested: str) -> str:
    """train.device resolved without touching a GPU: auto is cuda when torch sees one and DeepSpeed is not
    pinned to another accelerator (DS_ACCELERATOR=cpu runs on the CPU, as DeepSpeed's engine will)."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() and pinned_accelerator() in (None, "cuda") else "cpu"
    return requested


def gpu_index(local_rank: int) -> int:
    """This rank's GPU: its local rank, or 0 where the launcher gave each process one GPU of its own."""
    return 0 if torch.cuda.device_count() == 1 else local_rank
