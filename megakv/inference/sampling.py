"""Choosing the next token from logits: greedy, or temperature sampling restricted by top-k and top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0: greedy (argmax); > 0: sample from softmax(logits / temperature)
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p (1: all)
    seed: int | None = None  # seeds a private generator: the same seed gives the same tokens

    def __post_init__(self) -> None:
        if not 0 <= self.temperature < float("inf"):  # NaN fails too; inf would sample uniformly, whatever the model
            raise ValueError(f"temperature must be finite and >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no limit), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: str | torch.device = "cpu") -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set logits outside the top-k / top-p set to -inf. logits: (batch, vocab)."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens ranked above it already reach top_p (the most likely is always kept).
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def check_finite_logits(logits: torch.Tensor) -> None:
    """NaN/inf logits would give token 0 greedily (or a torch traceback sampling): name the likely cause."""
    if not bool(torch.isfinite(logits).all()):
        raise ValueError(f"the model's logits are not finite (NaN or inf) in {str(logits.dtype).removeprefix('torch.')}"
                         ": its activations overflow this dtype (float16 holds at most 65504), or its weights hold "
                         "NaN/inf. Fix: run it with --dtype bfloat16 or float32")


def sample_next_token(logits: torch.Tensor, config: SamplingConfig,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (batch, vocab) -> token ids (batch,)."""
    check_finite_logits(logits)
    if config.greedy or config.temperature < torch.finfo(torch.float32).tiny:  # greedy to any precision
        return logits.argmax(-1)
    # Shifted so the largest is 0 before dividing: a tiny temperature sends the others to -inf, never to NaN.
    logits = logits.float()
    scaled = filter_logits((logits - logits.amax(-1, keepdim=True)) / config.temperature, config.top_k, config.top_p)
    return torch.multinomial(scaled.softmax(-1), 1, generator=generator).squeeze(-1)
