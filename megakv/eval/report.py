"""Presenting evaluation results: a text table, a JSON file, a PNG plot of loss against retention."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from megakv.eval.loss import PlanLoss


def format_table(results: Sequence[PlanLoss]) -> str:
    header = f"{'retain':<14}{'layers':>7}{'cache %':>9}{'KV B/token':>12}{'loss':>9}{'ppl':>11}{'tokens':>9}"
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(f"{r.retain:<14}{len(r.retained):>7}{100 * r.retained_fraction:>8.1f}%{r.kv_bytes_per_token:>12}"
                    f"{r.loss:>9.4f}{r.perplexity:>11.3f}{r.tokens:>9}")
    return "\n".join(rows)


def write_json(results: Sequence[PlanLoss], path: str | Path, **metadata) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**metadata, "results": [r.to_dict() for r in results]}, indent=2) + "\n")
    return path


def is_pattern(retain: str) -> bool:
    return retain.strip().lower() in ("all", "full") or retain.strip().lower().startswith("every:")


def plot_loss_vs_retention(results: Sequence[PlanLoss], path: str | Path, title: str = "") -> Path:
    # The object API (no pyplot): no global figure state, no GUI backend needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # every-k patterns form a curve; explicit layer sets are separate points.
    patterns = sorted((r for r in results if is_pattern(r.retain)), key=lambda r: r.retained_fraction)
    explicit = [r for r in results if not is_pattern(r.retain)]
    if patterns:
        axes.plot([100 * r.retained_fraction for r in patterns], [r.loss for r in patterns], marker="o",
                  label="every:K")
    if explicit:
        axes.scatter([100 * r.retained_fraction for r in explicit], [r.loss for r in explicit], marker="s",
                     color="tab:orange", label="explicit layer sets", zorder=3)
    for r in results:
        axes.annotate(r.retain, (100 * r.retained_fraction, r.loss), textcoords="offset points", xytext=(4, 4),
                      fontsize=8)
    axes.legend(fontsize=8)
    axes.set_xlabel("KV cache retained (% of layers)")
    axes.set_ylabel("validation loss (nats / token)")
    axes.set_title(title or "loss vs KV cache retention")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path
