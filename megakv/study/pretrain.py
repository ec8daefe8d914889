"""Part 2 of the study, the pre-training sweep (the paper's Table 1 and Fig. 5, in miniature).

One deep model trained from scratch at each q_cross of the scale's sweep (q 0 is routing `none`: the
normally trained model; the others R-CLA), plus shallower full-cache models of the same width whose cache
equals the deep model's at 50% and 25% retention (every:2, every:4), all on the same tokens. Claims:
R-CLA at the largest q costs < 2% held-out loss at full cache (paper: 2.424 -> 2.461 at p = 0.75), and the
deep model with sharing beats the shallow full-cache model of the same cache size (paper Fig. 5).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path

from megakv.study.results import Claim, PartResult, Table, no_verdict_unless_finite
from megakv.study.runs import Trainings
from megakv.study.scratch import (
    BASE_SEED,
    RETAINS,
    ScratchRun,
    ScratchScale,
    budget_note,
    described,
    plot_lines,
    prepare_data,
    retained_layers,
    scale_settings,
    seed_note,
    seed_repeats,
    seed_spread,
    timing_note,
    train_and_score,
    unfinished,
)

PART = "pretrain"
SHARED_FRACTIONS = (2, 4)  # the shallow baselines match every:2 and every:4
FULL_CACHE_LIMIT = 0.02  # the paper's "< 2% even at p = 0.75"


def deep_run(study_dir: Path, settings: ScratchScale, q_cross: float) -> ScratchRun:
    name = f"q{q_cross:g}"
    strategy = "none" if q_cross == 0 else "rcla"
    return ScratchRun(name, study_dir / PART / "runs" / name, strategy, q_cross, settings.model.n_layers)


def shallow_runs(study_dir: Path, settings: ScratchScale) -> list[ScratchRun]:
    runs = []
    for k in SHARED_FRACTIONS:
        layers = retained_layers(f"every:{k}", settings.model.n_layers)
        runs.append(ScratchRun(f"shallow-L{layers}", study_dir / PART / "runs" / f"shallow-L{layers}", "none", 0.0,
                               layers))
    return runs


def reference_run(study_dir: Path, settings: ScratchScale) -> ScratchRun:
    """The sweep's R-CLA model at the scale's reference q: the ablation's R-CLA row (trained once, here)."""
    return deep_run(study_dir, settings, settings.reference_q)


def reference_repeats(study_dir: Path, settings: ScratchScale) -> list[ScratchRun]:
    """The reference model trained with other seeds: the noise floor of every comparison (shared by the parts)."""
    return seed_repeats(reference_run(study_dir, settings), settings.seed_repeats)


def reference_by_seed(study_dir: Path, settings: ScratchScale,
                      losses: Mapping[str, Mapping[str, float]]) -> dict[int, Mapping[str, float]]:
    runs = [reference_run(study_dir, settings), *reference_repeats(study_dir, settings)]
    return {run.seed: losses[run.name] for run in runs}


# ------------------------------------------------------------------------------------------- claims


def _pct(value: float) -> str:
    return f"{100 * value:+.2f}%"  # two decimals: +1.96% read "+2.0%" next to a verdict of "< 2%"


def full_cache_cost_claim(deep: Mapping[float, Mapping[str, float]], noise: float | None = None) -> Claim:
    """R-CLA at the sweep's largest q against the normally trained model (q 0), both with the full cache.

    `noise` is the reference model's full-cache seed spread, shown beside the cost (the verdict is the
    paper's threshold either way).
    """
    q_max = max(deep)
    base, rcla = deep[0.0]["every:1"], deep[q_max]["every:1"]
    cost = rcla / base - 1
    noise_text = f"; seed spread of one model: {100 * noise:.1f}%" if noise else ""
    return Claim(
        claim=f"Training with R-CLA at q_cross {q_max:g} costs < 2% held-out loss at full cache",
        paper="eval loss 2.424 at p=0 vs 2.461 at p=0.75 (+1.5%): \"< 2% even at p = 0.75\" (Table 1)",
        measured=f"{base:.4f} at q 0 vs {rcla:.4f} at q {q_max:g} ({_pct(cost)}{noise_text})",
        held=cost < FULL_CACHE_LIMIT)


def depth_claims(deep: Mapping[float, Mapping[str, float]], shallow: Mapping[int, float],
                 n_layers: int) -> list[Claim]:
    """At each shallow model's cache size: the best R-CLA q of the sweep, shared at that size, vs the shallow one."""
    claims = []
    for layers, shallow_loss in sorted(shallow.items(), reverse=True):
        spec = f"every:{n_layers // layers}"
        if retained_layers(spec, n_layers) != layers:
            raise ValueError(f"a {layers}-layer baseline has no every-k match in a {n_layers}-layer model")
        rcla = {q: losses[spec] for q, losses in deep.items() if q > 0}
        best_q = min(rcla, key=rcla.get)
        margin = rcla[best_q] / shallow_loss - 1
        others = ", ".join(f"q {q:g} {v:.4f}" for q, v in sorted(rcla.items()))
        claims.append(Claim(
            claim=f"At {100 * layers / n_layers:.0f}% cache ({layers} of {n_layers} layers), the deep R-CLA model "
                  f"shared at {spec} beats a {layers}-layer full-cache model trained on the same tokens",
            paper="Fig. 5: at every cache size, lower eval loss than the shallower full-cache baseline "
                  "with the same cache (no exact numbers)",
            measured=f"best R-CLA (q {best_q:g}) {rcla[best_q]:.4f} vs {layers}-layer {shallow_loss:.4f} "
                     f"({_pct(margin)}); all: {others}",
            held=margin < 0))
    return claims


def sharing_claim(deep: Mapping[float, Mapping[str, float]], reference_q: float) -> Claim:
    """R-CLA's loss grows less under sharing than the normally trained model's, at every shared retention."""
    def growth(q: float) -> dict[str, float]:
        return {r: deep[q][r] / deep[q]["every:1"] - 1 for r in RETAINS[1:]}

    base, rcla = growth(0.0), growth(reference_q)
    shown = "; ".join(f"{r}: {_pct(base[r])} vs {_pct(rcla[r])}" for r in RETAINS[1:])
    return Claim(
        claim=f"Sharing the cache hurts the R-CLA model (q {reference_q:g}) less than the normally trained one, "
              f"at every retention below 100%",
        paper="qualitative: R-CLA degrades gracefully under sharing, the model trained without it collapses "
              "(Table 2, fine-tuning)",
        measured=f"loss growth over own full cache, normal vs R-CLA: {shown}",
        held=all(rcla[r] < base[r] for r in RETAINS[1:]))


# ------------------------------------------------------------------------------------------- tables


def sweep_table(deep: Mapping[float, Mapping[str, float]], shallow: Mapping[int, float], n_layers: int) -> Table:
    base = deep[0.0]["every:1"]
    rows = []
    for q, losses in sorted(deep.items()):
        rows.append([f"q_cross {q:g}" + (" (normal)" if q == 0 else " (R-CLA)"), n_layers,
                     *[round(losses[r], 4) for r in RETAINS], _pct(losses["every:1"] / base - 1)])
    for layers, loss in sorted(shallow.items(), reverse=True):
        rows.append(["shallow, full cache", layers, round(loss, 4), None, None, None, _pct(loss / base - 1)])
    return Table(caption="Table 1 analogue: held-out loss at each retention (every:k keeps layers 0, k, 2k, ...)",
                 columns=["model", "layers", *RETAINS, "full cache vs q 0"], rows=rows)


def cache_table(deep: Mapping[float, Mapping[str, float]], shallow: Mapping[int, float], n_layers: int) -> Table:
    rows = []
    for spec in RETAINS:
        layers = retained_layers(spec, n_layers)
        rcla = {q: losses[spec] for q, losses in deep.items() if q > 0}
        best_q = min(rcla, key=rcla.get)
        rows.append([layers, f"{100 * layers / n_layers:.1f}%", round(deep[0.0][spec], 4), round(rcla[best_q], 4),
                     f"q {best_q:g}", round(shallow[layers], 4) if layers in shallow else None])
    return Table(caption="Fig. 5 analogue: held-out loss at equal cache size (cached layers)",
                 columns=["cached layers", "cache", f"{n_layers}-layer normal, shared", f"{n_layers}-layer best R-CLA",
                          "best q", "shallow full-cache model"], rows=rows)


def plots(part_dir: Path, deep: Mapping[float, Mapping[str, float]], shallow: Mapping[int, float],
          n_layers: int) -> list[str]:
    cached = [retained_layers(r, n_layers) for r in RETAINS]
    lines = {f"{n_layers} layers, q_cross {q:g}" + (" (normal)" if q == 0 else ""): (cached, [d[r] for r in RETAINS])
             for q, d in sorted(deep.items())}
    markers = {"shallow models, full cache": (sorted(shallow), [shallow[k] for k in sorted(shallow)])}
    return [plot_lines(part_dir / "pretrain_cache_vs_loss.png", "Loss at equal cache (Fig. 5 analogue)",
                       "cached layers (KV cache per token)", "held-out loss", lines, markers, invert_x=True)]


# ------------------------------------------------------------------------------------------- the part


def run(part_dir: Path, scale: str, *, log: Callable[[str], None], trainings: Trainings | None = None) -> PartResult:
    start = time.perf_counter()
    settings = scale_settings(scale)
    study_dir = part_dir.parent
    data = prepare_data(study_dir, settings, log)
    n_layers = settings.model.n_layers
    deep_runs = {q: deep_run(study_dir, settings, q) for q in settings.q_sweep}
    shallow = {run.n_layers: run for run in shallow_runs(study_dir, settings)}
    repeats = reference_repeats(study_dir, settings)
    runs = [*deep_runs.values(), *shallow.values(), *repeats]
    trained, started = unfinished(runs), time.perf_counter()
    losses = train_and_score(runs, settings, data,
                             retains_of=lambda r: RETAINS if r.n_layers == n_layers else RETAINS[:1], log=log,
                             trainings=trainings)
    timing = timing_note(part_dir, runs, time.perf_counter() - started, trained)
    deep = {q: losses[r.name] for q, r in deep_runs.items()}
    shallow_loss = {layers: losses[r.name]["every:1"] for layers, r in shallow.items()}

    by_seed = reference_by_seed(study_dir, settings, losses)
    noise = seed_spread(by_seed)["every:1"] if len(by_seed) > 1 else None
    claims = no_verdict_unless_finite([full_cache_cost_claim(deep, noise), *depth_claims(deep, shallow_loss, n_layers),
                                       sharing_claim(deep, settings.reference_q)],
                                      [*(v for losses in deep.values() for v in losses.values()),
                                       *shallow_loss.values()])
    notes = ["q_cross 0 is trained with routing `none` (the same plans as rcla at q 0: every layer its own K/V).",
             f"Every model sees the same tokens in the same order (data.seed {BASE_SEED}); every model but the "
             f"seed repeats also shares the initialisation and routing seed {BASE_SEED}. The shallow models have "
             "the deep model's width and differ only in depth.",
             budget_note(deep_runs[0.0], settings),
             seed_note(f"R-CLA q {settings.reference_q:g}", by_seed),
             timing]
    return PartResult(part=PART, title="Pre-training sweep from scratch (Table 1 / Fig. 5 analogue)", scale=scale,
                      seconds=time.perf_counter() - start, settings=described(settings, data),
                      tables=[sweep_table(deep, shallow_loss, n_layers), cache_table(deep, shallow_loss, n_layers)],
                      claims=claims, plots=plots(part_dir, deep, shallow_loss, n_layers), notes=notes)
