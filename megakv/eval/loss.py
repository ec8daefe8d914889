"""Loss and perplexity of a model under one or several deployment plans, on the same windows."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from megakv.inference.cache import kv_bytes_per_token
from megakv.inference.engine import resolve_plan
from megakv.model import MegaKVModel
from megakv.routing import RoutingPlan


@dataclass(frozen=True)
class PlanLoss:
    retain: str  # the spec as given (every:2, 0,3,5, ...)
    retained: tuple[int, ...]
    retained_fraction: float
    kv_bytes_per_token: int  # at `cache_dtype`
    cache_dtype: str
    loss: float  # mean next-token cross-entropy (nats)
    perplexity: float
    tokens: int  # predicted tokens

    def to_dict(self) -> dict:
        return asdict(self)


LOGIT_CHUNK_ELEMENTS = 1 << 25  # fp32 logits scored at once (128 MiB): a long window x a large vocabulary
# (8K x 49K for SmolLM2, 64K x 128K for Llama 3) would otherwise need gigabytes of logits per window.
BATCH_SIZE = 8  # windows per forward pass


@torch.no_grad()
def mean_loss(model: MegaKVModel, plan: RoutingPlan, windows: torch.Tensor, batch_size: int = BATCH_SIZE,
              progress: Callable[[int], None] | None = None) -> tuple[float, int]:
    """(mean cross-entropy over all predicted tokens, their count) for windows (n, seq + 1).

    The output head runs on chunks of positions (LOGIT_CHUNK_ELEMENTS logits at a time); the sum is the same.
    `progress(n)` is told after each batch how many windows it held."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = model.embed.weight.device
    rows = max(1, LOGIT_CHUNK_ELEMENTS // model.cfg.vocab_size)
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        inputs = batch[:, :-1]
        hidden = model.run_layers(model.embed(inputs), model.default_positions(inputs), plan).flatten(0, 1)
        labels = batch[:, 1:].flatten()
        for first in range(0, len(labels), rows):
            logits = model.head(hidden[first:first + rows]).float()
            total += F.cross_entropy(logits, labels[first:first + rows], reduction="sum").item()
        count += labels.numel()
        if progress is not None:
            progress(len(batch))
    if not math.isfinite(total):  # a NaN would be printed as the model's loss, exit 0
        raise ValueError(f"the loss is not finite in {str(model.embed.weight.dtype).removeprefix('torch.')}: the "
                         "model's activations overflow this dtype (float16 holds at most 65504), or its weights hold "
                         "NaN/inf. Fix: evaluate with --dtype bfloat16 or float32")
    return total / count, count


def evaluate_plans(model: MegaKVModel, specs: Sequence[str], windows: torch.Tensor, batch_size: int = BATCH_SIZE,
                   cache_dtype: torch.dtype = torch.bfloat16,
                   progress: Callable[[int], None] | None = None) -> list[PlanLoss]:
    """One PlanLoss per retention spec, all on the same windows."""
    results = []
    for spec in specs:
        plan = resolve_plan(spec, model.cfg.n_layers)
        loss, count = mean_loss(model, plan, windows, batch_size, progress)
        results.append(PlanLoss(
            retain=spec if isinstance(spec, str) else ",".join(map(str, spec)), retained=plan.retained,
            retained_fraction=plan.retained_fraction,
            kv_bytes_per_token=kv_bytes_per_token(model.cfg, len(plan.retained), cache_dtype),
            cache_dtype=str(cache_dtype).removeprefix("torch."), loss=loss,
            perplexity=math.exp(min(loss, 700.0)), tokens=count))
    return results
