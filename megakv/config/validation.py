"""Periodic validation loss at several deployment retention levels (the `validation:` section)."""

from __future__ import annotations

from dataclasses import dataclass, field

from megakv.config.errors import ConfigError
from megakv.routing import deployment_plan


@dataclass
class ValidationConfig:
    every: int = 100  # evaluate every N optimizer steps and after the last one (0: never)
    samples: int = 64  # validation sequences per evaluation (the first ones of the validation split)
    # Deployment plans (megakv.routing.deployment_plan): every:1 = 100% cache, every:2 = 50%, ...
    plans: list[str] = field(default_factory=lambda: ["every:1", "every:2", "every:3", "every:4"])

    def validate(self, n_layers: int, prefix: str = "validation") -> None:
        if self.every < 0:
            raise ConfigError(f"{prefix}.every", self.every, "must be >= 0", "0 disables validation")
        if self.samples < 1:
            raise ConfigError(f"{prefix}.samples", self.samples, "must be >= 1", "e.g. 64")
        for spec in self.plans:
            try:
                deployment_plan(spec, n_layers)
            except ValueError as e:
                raise ConfigError(f"{prefix}.plans", spec, str(e), "use every:K or a list like 0,2,4") from None
