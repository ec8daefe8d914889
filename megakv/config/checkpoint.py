"""Checkpointing and resuming (the `checkpoint:` section)."""

from __future__ import annotations

from dataclasses import dataclass

from megakv.config.errors import ConfigError


@dataclass
class CheckpointConfig:
    every: int = 500  # save every N optimizer steps (0: only at the end and on a stop signal)
    keep_last: int = 3  # complete checkpoints kept; older ones are deleted after a new one is complete
    save_final: bool = True  # save after the last step
    # none: start fresh (refuses a run_dir that already holds checkpoints); auto: continue from the newest
    # complete checkpoint in run_dir if there is one, else start fresh.
    resume: str = "none"
    # Resume even though settings that change what the run computes (train.global_batch, routing.*,
    # data.reset_*) differ from the checkpoint's; every change is logged (megakv-train --allow-config-change).
    allow_config_change: bool = False
    # Start from the weights of a megakv model directory (optimizer and schedule start fresh); null: random.
    init_from: str | None = None

    def validate(self, prefix: str = "checkpoint") -> None:
        def need(ok: bool, name: str, problem: str, fix: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), problem, fix)

        need(self.every >= 0, "every", "must be >= 0", "0 saves only at the end / on a stop signal")
        need(self.keep_last >= 1, "keep_last", "must be >= 1", "keep at least the newest checkpoint")
        need(self.resume in ("none", "auto"), "resume", "expected none or auto",
             "pass --resume auto (or checkpoint.resume=auto) to continue a run")
