"""Rank-prefixed logging: every rank writes RUN_DIR/logs/rank{R}.log; rank 0 also talks on the console."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from megakv.config.logging import LoggingConfig

FORMAT = "[rank {rank}] %(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(rank: int, log_dir: Path, cfg: LoggingConfig) -> logging.Logger:
    import deepspeed  # noqa: F401 - creates its logger (with its own handler) on import; re-routed below

    formatter = logging.Formatter(FORMAT.format(rank=rank), datefmt="%H:%M:%S")
    console = logging.StreamHandler(sys.stderr)
    console.setLevel((cfg.level if rank == 0 else cfg.other_ranks_console).upper())
    console.setFormatter(formatter)
    log_dir.mkdir(parents=True, exist_ok=True)
    to_file = logging.FileHandler(log_dir / f"rank{rank}.log")
    to_file.setLevel(cfg.level.upper())
    to_file.setFormatter(formatter)
    root = logging.getLogger("megakv")
    root.handlers[:] = [console, to_file]
    root.setLevel(cfg.level.upper())
    root.propagate = False
    # DeepSpeed is chatty at INFO on every rank; keep its warnings, through our rank-prefixed handlers.
    ds_logger = logging.getLogger("DeepSpeed")
    ds_logger.handlers[:] = [console, to_file]
    ds_logger.setLevel(logging.DEBUG if cfg.level == "debug" else logging.WARNING)
    ds_logger.propagate = False
    return root


def close_logging() -> None:
    for name in ("megakv", "DeepSpeed"):
        for handler in logging.getLogger(name).handlers:
            handler.flush()
            handler.close()
