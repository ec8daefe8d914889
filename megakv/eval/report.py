"""Presenting evaluation results: a text table, a JSON file, a PNG plot of loss against retention."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from megakv.eval.loss import PlanLoss


def format_table(results: Sequence[PlanLoss], cache_dtype: str | None = None) -> str:
    """`cache_dtype`: the dtype the KV bytes are counted in (the model may run in another)."""
    header = f"{'retain':<14}{'layers':>7}{'cache %':>9}{'KV B/token':>12}{'loss':>9}{'ppl':>11}{'tokens':>9}"
    rows = [header, "-" * len(header)]
    for r in results:
        rows.append(f"{r.retain:<14}{len(r.retained):>7}{100 * r.retained_fraction:>8.1f}%{r.kv_bytes_per_token:>12}"
                    f"{r.loss:>9.4f}{r.perplexity:>11.3f}{r.tokens:>9}")
    if cache_dtype is not None:
        rows.append(f"(KV B/token: the retained layers' K/V of one token stored as {cache_dtype}, --cache-dtype)")
    return "\n".join(rows)


def format_comparison(models: dict[str, Sequence[PlanLoss]]) -> str:
    """One row per plan, one column pair per model: its loss and the ratio to its own first plan's loss."""
    names = list(models)
    first = {name: models[name][0].loss for name in names}
    header = f"{'retain':<14}{'cache %':>9}" + "".join(f"  {name[-28:]:>28}{'ratio':>7}" for name in names)
    rows = [header, "-" * len(header)]
    for i, plan in enumerate(models[names[0]]):
        row = f"{plan.retain:<14}{100 * plan.retained_fraction:>8.1f}%"
        for name in names:
            loss = models[name][i].loss
            row += f"  {loss:>28.4f}{loss / first[name]:>7.3f}"
        rows.append(row)
    return "\n".join(rows)


def write_json(results: Sequence[PlanLoss], path: str | Path, **metadata) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**metadata, "results": [r.to_dict() for r in results]}, indent=2) + "\n")
    return path


def is_pattern(retain: str) -> bool:
    return retain.strip().lower() in ("all", "full") or retain.strip().lower().startswith("every:")


# The y-axis spans at least this fraction of the loss, so run-to-run noise does not look like a trend.
MIN_Y_SPAN_FRACTION = 0.02


def label_placements(results: Sequence[PlanLoss]) -> list[tuple[int, float, str, tuple[int, int], str]]:
    """(KV bytes/token, loss, label, text offset in points, horizontal alignment) per distinct point.

    Plans with the same retained set share one label ('every:4 = every:5') instead of overprinting each
    other; different sets of the same size (same bytes) get their labels on alternating sides and heights.
    """
    groups: dict[tuple[int, ...], list[PlanLoss]] = {}
    for r in results:
        groups.setdefault(tuple(r.retained), []).append(r)
    points = sorted((members[0].kv_bytes_per_token, members[0].loss,
                     " = ".join(dict.fromkeys(m.retain for m in members))) for members in groups.values())
    placed, seen_at_bytes = [], {}
    for bytes_per_token, loss, label in points:
        index = seen_at_bytes.get(bytes_per_token, 0)
        seen_at_bytes[bytes_per_token] = index + 1
        side = 1 if index % 2 == 0 else -1
        placed.append((bytes_per_token, loss, label, (6 * side, 4 + 10 * (index // 2)),
                       "left" if side > 0 else "right"))
    return placed


def plot_loss_vs_retention(results: Sequence[PlanLoss], path: str | Path, title: str = "") -> Path:
    """Loss against KV cache bytes per token; the full-cache plan is drawn as a dashed reference line."""
    # The object API (no pyplot): no global figure state, no GUI backend needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure = Figure(figsize=(6.5, 4), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    # every-k patterns form a curve; explicit layer sets are separate points.
    patterns = sorted((r for r in results if is_pattern(r.retain)), key=lambda r: r.kv_bytes_per_token)
    explicit = [r for r in results if not is_pattern(r.retain)]
    if patterns:
        axes.plot([r.kv_bytes_per_token for r in patterns], [r.loss for r in patterns], marker="o",
                  label="every:K")
    if explicit:
        axes.scatter([r.kv_bytes_per_token for r in explicit], [r.loss for r in explicit], marker="s",
                     color="tab:orange", label="explicit layer sets", zorder=3)
    full = [r for r in results if r.retained_fraction == 1.0]
    if full:
        axes.axhline(full[0].loss, color="grey", linestyle="--", linewidth=1,
                     label=f"full cache ({full[0].loss:.4f})")
    for bytes_per_token, loss, label, offset, align in label_placements(results):
        axes.annotate(label, (bytes_per_token, loss), textcoords="offset points", xytext=offset, ha=align,
                      fontsize=8)
    losses = [r.loss for r in results]
    low, high = min(losses), max(losses)
    span = max(high - low, MIN_Y_SPAN_FRACTION * max(abs(high), 1e-9))
    middle = (low + high) / 2
    axes.set_ylim(middle - 0.6 * span, middle + 0.6 * span)
    axes.margins(x=0.12)
    axes.legend(fontsize=8)
    dtype = results[0].cache_dtype if results else ""
    axes.set_xlabel(f"KV cache bytes per token ({dtype})")
    axes.set_ylabel("validation loss (nats / token)")
    axes.set_title(title or "loss vs KV cache size")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return path
