"""The training run itself (the `train:` section): length, batch sizes, precision, seeds, debug switches."""

from __future__ import annotations

from dataclasses import dataclass, field

from megakv.config.errors import ConfigError

PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class DebugConfig:
    """Switches for checking and for fault-injection tests; all off in real runs."""

    # Verify with a collective that every rank holds the same routing plans each step (fails loudly), and
    # write each rank's plans to logs/plans_rank{R}.txt.
    check_plans: bool = False
    # Fault injection for tests; step numbers count from 1 (step N = the N-th optimizer step), -1 = never.
    # Make the loss (and so the gradients) non-finite in these steps.
    nonfinite_loss_at: list[int] = field(default_factory=list)
    # Global rank 0 sends itself SIGTERM during this step: the run saves after it and exits.
    sigterm_at_step: int = -1
    # Global rank 0 SIGKILLs itself while writing the checkpoint of this step (after its shards).
    sigkill_while_saving_step: int = -1
    # Every step lasts at least this long (seconds): holds a run inside a step for signal tests.
    min_step_s: float = 0.0


@dataclass
class TrainConfig:
    run_dir: str = "runs/megakv"  # holds config.yaml, ds_config.json, checkpoints/, tensorboard/, logs/
    steps: int = 1000  # optimizer steps in the whole run (the schedule's length)
    global_batch: int = 32  # sequences per optimizer step, independent of the number of ranks
    micro_batch: int = 4  # sequences per forward pass on one rank
    precision: str = "fp32"  # fp32 | bf16
    seed: int = 1234  # weight initialisation and torch/numpy RNGs (routing has its own seed)
    device: str = "auto"  # auto (cuda when available) | cpu | cuda
    max_nonfinite_steps: int = 5  # stop after this many non-finite steps in a row (each one is skipped)
    # Recompute each transformer block's activations in the backward instead of keeping them (dense and
    # pipeline); a recomputed layer attends to the same K/V it read the first time.
    activation_checkpointing: bool = False
    debug: DebugConfig = field(default_factory=DebugConfig)

    def validate(self, prefix: str = "train") -> None:
        def need(ok: bool, name: str, problem: str, fix: str) -> None:
            if not ok:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), problem, fix)

        need(bool(self.run_dir), "run_dir", "must not be empty", "e.g. runs/my-run")
        need(self.steps > 0, "steps", "must be positive", "set the number of optimizer steps")
        need(self.global_batch > 0, "global_batch", "must be positive", "e.g. 32")
        need(self.micro_batch > 0, "micro_batch", "must be positive", "e.g. 4")
        need(self.global_batch % self.micro_batch == 0, "global_batch",
             f"not a multiple of train.micro_batch={self.micro_batch}",
             "choose global_batch = micro_batch x data-parallel ranks x accumulation steps")
        need(self.precision in PRECISIONS, "precision", f"expected one of {PRECISIONS}",
             "fp32, or bf16 on hardware with bf16 support")
        need(self.device in DEVICES, "device", f"expected one of {DEVICES}", "use auto")
        need(self.seed >= 0, "seed", "must be >= 0", "any non-negative integer")
        need(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", "must be >= 1", "e.g. 5")
