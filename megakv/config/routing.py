"""Training-time KV routing settings (the `routing:` section)."""

from __future__ import annotations

from dataclasses import dataclass

from megakv.config.errors import ConfigError
from megakv.routing import parse_strategy


@dataclass
class RoutingConfig:
    # rcla | none | cla:K | rdcla:K  (see megakv/routing.py)
    strategy: str = "rcla"
    # P(a layer attends with an earlier layer's K/V). For rdcla:K, P(a non-leader uses its leader's K/V).
    q_cross: float = 0.5
    # rcla only: route to one of the `max_distance` nearest earlier layers (null: any earlier layer, as the paper).
    max_distance: int | None = None
    seed: int = 1234
    # false: one plan per optimizer step (all micro-batches share it); true: one plan per micro-batch.
    per_micro_batch: bool = False
    # Ramp q_cross linearly from 0 at step 0 to its value at this step (0: no ramp, the paper). Fine-tuning
    # a pretrained model at full q_cross starts it far off (every:2 loss ~12 for SmolLM2); a ramp lets it
    # learn to read its neighbours' K/V before most of its layers must.
    q_cross_warmup_steps: int = 0

    def q_cross_at(self, step: int) -> float:
        """q_cross for the 0-based optimizer step `step`."""
        if self.q_cross_warmup_steps <= 0 or step >= self.q_cross_warmup_steps:
            return self.q_cross
        return self.q_cross * step / self.q_cross_warmup_steps

    def validate(self, n_layers: int, prefix: str = "routing") -> None:
        try:
            parse_strategy(self.strategy, n_layers)
        except ValueError as e:
            raise ConfigError(f"{prefix}.strategy", self.strategy, str(e),
                              "use rcla, none, cla:K or rdcla:K with 1 <= K <= n_layers") from None
        if not 0.0 <= self.q_cross <= 1.0:
            raise ConfigError(f"{prefix}.q_cross", self.q_cross, "a probability must lie in [0, 1]",
                              "q_cross is P(cross-layer); the paper sweeps 0.25..0.75")
        if self.max_distance is not None and self.max_distance < 1:
            raise ConfigError(f"{prefix}.max_distance", self.max_distance, "must be >= 1 or null",
                              "null lets a layer read any earlier layer")
        if self.seed < 0:  # numpy's SeedSequence, which draws the plans, takes no negative seed
            raise ConfigError(f"{prefix}.seed", self.seed, "must be >= 0", "any non-negative integer")
        if self.q_cross_warmup_steps < 0:
            raise ConfigError(f"{prefix}.q_cross_warmup_steps", self.q_cross_warmup_steps, "must be >= 0",
                              "0 trains at q_cross from the first step; N ramps it up over N steps")
