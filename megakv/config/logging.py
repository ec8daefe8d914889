"""Console, log files and TensorBoard (the `logging:` section)."""

from __future__ import annotations

from dataclasses import dataclass

from megakv.config.errors import ConfigError

LEVELS = ("debug", "info", "warning", "error")


@dataclass
class LoggingConfig:
    log_every: int = 10  # the console line every N steps (metrics.jsonl and TensorBoard get every step)
    tensorboard: bool = True  # write run_dir/tensorboard/ on the rank that holds the loss
    level: str = "info"  # level of the rank-prefixed logs (log files of every rank, console of rank 0)
    other_ranks_console: str = "warning"  # console level of ranks other than 0 (their files keep `level`)
    # Peak FLOP/s of one device (e.g. 989e12 for an H100's dense bf16) for model FLOPs utilisation (MFU);
    # null: MFU is not reported (there is no meaningful peak to assume, least of all on a CPU).
    peak_flops_per_device: float | None = None

    def validate(self, prefix: str = "logging") -> None:
        if self.log_every < 1:
            raise ConfigError(f"{prefix}.log_every", self.log_every, "must be >= 1", "e.g. 10")
        if self.peak_flops_per_device is not None and not self.peak_flops_per_device > 0:
            raise ConfigError(f"{prefix}.peak_flops_per_device", self.peak_flops_per_device, "must be positive",
                              "the device's peak FLOP/s at the training precision, e.g. 989e12; null to skip MFU")
        for name in ("level", "other_ranks_console"):
            if getattr(self, name) not in LEVELS:
                raise ConfigError(f"{prefix}.{name}", getattr(self, name), f"expected one of {LEVELS}", "use info")
