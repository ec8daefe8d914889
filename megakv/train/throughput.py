"""What Megatron and torchtitan users read off a training log: parameter count, step time, peak memory,
and model FLOPs utilisation (MFU) against a configured peak.

Model FLOPs per token follow the PaLM convention: 6 x (parameters in matrix multiplies) for forward and
backward, plus 12 x layers x attention width x sequence length for the attention scores and values, for
the dense model. R-CLA layers that read an earlier layer's K/V skip their own K/V projections, so the
work actually done is a little less: MFU counts the model's FLOPs, not the hardware's.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass

import torch

from megakv.config.model import ModelConfig
from megakv.model import MegaKVModel


@dataclass(frozen=True)
class ParameterCount:
    total: int
    embedding: int  # the input embedding table (a lookup, no FLOPs)
    matmul: int  # parameters used in matrix multiplies per token, the output projection included

    def describe(self) -> str:
        return (f"{self.total:,} parameters ({self.total / 1e6:,.2f} M; {self.total - self.embedding:,} "
                f"outside the input embedding)")


def count_parameters(cfg: ModelConfig) -> ParameterCount:
    """Counted on a meta-device copy: exact under any ZeRO stage or parallel layout, and free."""
    with torch.device("meta"):
        model = MegaKVModel(cfg)
    total = sum(p.numel() for p in model.parameters())
    embedding = model.embed.weight.numel()
    matmul = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and not name.startswith("embed"))
    if cfg.tie_embeddings:  # the tied table also serves as the output projection
        matmul += embedding
    return ParameterCount(total, embedding, matmul)


def flops_per_token(cfg: ModelConfig, params: ParameterCount, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token of a dense forward over `seq_len` tokens."""
    attention_width = cfg.n_heads * cfg.resolved_head_dim
    return 6.0 * params.matmul + 12.0 * cfg.n_layers * attention_width * seq_len


def peak_memory_bytes(device: torch.device) -> tuple[int, str]:
    """(bytes, what they measure): max allocated on a GPU, the process's peak resident set on a CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "max allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024), "peak RSS"  # Linux reports KiB


class StepMeter:
    """Per-step figures for the log line and TensorBoard."""

    def __init__(self, cfg: ModelConfig, seq_len: int, tokens_per_step: int, world_size: int,
                 device: torch.device, peak_flops_per_device: float | None):
        self.params = count_parameters(cfg)
        self.flops_per_token = flops_per_token(cfg, self.params, seq_len)
        self.tokens_per_step, self.world_size, self.device = tokens_per_step, world_size, device
        self.peak_flops = peak_flops_per_device

    def startup_line(self) -> str:
        mfu = (f"MFU against {self.peak_flops:.3g} FLOP/s per device" if self.peak_flops
               else "MFU not reported (set logging.peak_flops_per_device)")
        return (f"model: {self.params.describe()}; {self.flops_per_token:.3g} training FLOPs per token; {mfu}")

    def mfu(self, step_seconds: float) -> float | None:
        if not self.peak_flops or step_seconds <= 0:
            return None
        achieved = self.flops_per_token * self.tokens_per_step / step_seconds / self.world_size
        return achieved / self.peak_flops

    def scalars(self, step_seconds: float) -> dict[str, float | None]:
        memory, _ = peak_memory_bytes(self.device)
        return {"perf/step_time_s": step_seconds, "perf/peak_memory_gib": memory / 2**30,
                "perf/mfu": self.mfu(step_seconds),
                "perf/tokens_per_s_per_device": self.tokens_per_step / step_seconds / self.world_size}

    def log_fields(self, step_seconds: float) -> str:
        memory, kind = peak_memory_bytes(self.device)
        mfu = self.mfu(step_seconds)
        return (f"step {step_seconds:.3f} s | {kind} {memory / 2**30:.2f} GiB"
                + (f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""))


class EtaClock:
    """Time left, from whole loop iterations (a step with its validation, checkpoint saves and logging) over
    the last `window`, leaving out a launch's first iteration (start-up: allocation, caches, compilation)."""

    def __init__(self, window: int = 50):
        self.window = window
        self._last_start: float | None = None
        self._finished = 0
        self._times: list[float] = []

    def iteration_starts(self, now: float) -> None:
        if self._last_start is not None:
            self._finished += 1
            if self._finished > 1:
                self._times = (self._times + [now - self._last_start])[-self.window:]
        self._last_start = now

    def seconds_left(self, remaining_steps: int, step_seconds: float) -> float:
        """`step_seconds`: the step just run, the estimate until a whole later iteration has been timed."""
        per_step = sum(self._times) / len(self._times) if self._times else step_seconds
        return remaining_steps * per_step
