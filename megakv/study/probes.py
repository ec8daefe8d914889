"""Routing probes of the fine-tuning part: what each knob buys.

Short R-CLA fine-tunes of the same base model on the same data, at a smaller budget than the part's main
runs, each changing one setting: the source distance (`routing.max_distance`: any earlier layer as in the
paper, or the k nearest), the learning rate, a fresh plan per micro-batch or one per optimizer step. Each
is scored by its losses at every retention on the part's held-out records (no answers generated), cached
like the main runs (probes/<name>, eval/probe-<name>.json).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from megakv import recipes
from megakv.study.qa_scores import RETAINS, evaluate_model
from megakv.study.results import Table
from megakv.study.runs import Trainings, timed_train_run

Log = Callable[[str], None]
Scores = Mapping[str, Mapping[str, float]]


@dataclass(frozen=True)
class RoutingProbe:
    name: str
    max_distance: int | None  # None: any earlier layer (the paper)
    lr: float
    per_micro_batch: bool = True
    q_cross_warmup_steps: int = 0  # routing.q_cross_warmup_steps (0: q_cross from the first step, the paper)

    def describe(self) -> str:
        source = ("any earlier layer" if self.max_distance is None else "the layer just below"
                  if self.max_distance == 1 else f"one of the {self.max_distance} nearest")
        plans = "per micro-batch" if self.per_micro_batch else "per step"
        ramp = f", q_cross ramped up over {self.q_cross_warmup_steps} steps" if self.q_cross_warmup_steps else ""
        return f"source {source}, lr {self.lr:g}, a plan {plans}{ramp}"


def probe_settings(settings, probe: RoutingProbe):
    """The part's settings (FinetuneScale) at the probe budget with the probe's routing and lr."""
    return dataclasses.replace(settings, steps=settings.probe_steps, warmup_steps=settings.probe_warmup_steps,
                               lr=probe.lr, max_distance=probe.max_distance, per_micro_batch=probe.per_micro_batch,
                               q_cross_warmup_steps=probe.q_cross_warmup_steps)


def run_probes(part_dir: Path, settings, data_overrides: Sequence[str], test_records: Path,
               log: Log, trainings: Trainings | None = None) -> tuple[dict[str, Scores], dict[str, float]]:
    """Train (or reuse) and score every probe of `settings`; returns ({name: scores}, {name: seconds})."""
    def train(probe: RoutingProbe) -> float:
        chosen = probe_settings(settings, probe)
        return timed_train_run(recipes.path("finetune"), part_dir / "probes" / probe.name,
                               [*data_overrides, *chosen.overrides(), *chosen.routing("rcla")], log=log,
                               nproc=settings.nproc, threads=settings.threads, trainings=trainings)

    def score(probe: RoutingProbe) -> Scores:
        return evaluate_model(f"probe-{probe.name}", part_dir / "probes" / probe.name, test_records,
                              part_dir / "eval", log, records=settings.eval_records, seq_len=settings.seq_len,
                              max_new_tokens=0, device=settings.device)

    with ThreadPoolExecutor(max_workers=settings.concurrent_runs) as pool:
        seconds = dict(zip((p.name for p in settings.probes), pool.map(train, settings.probes)))
    with ThreadPoolExecutor(max_workers=settings.concurrent_runs) as pool:
        scores = dict(zip((p.name for p in settings.probes), pool.map(score, settings.probes)))
    return scores, seconds


def probe_table(settings, probe_scores: Mapping[str, Scores], main_scores: Mapping[str, Scores]) -> Table:
    """Held-out loss at every retention (and answer loss at 100% and 50%) of each probe, then the main runs."""
    columns = ["run", "settings", *(f"held-out {r}" for r in RETAINS), "answer every:1", "answer every:2"]

    def row(name: str, described: str, scores: Scores) -> list:
        return [name, described, *(round(scores[r]["heldout_loss"], 3) for r in RETAINS),
                round(scores["every:1"]["answer_loss"], 3), round(scores["every:2"]["answer_loss"], 3)]

    probe_budget = f"{settings.probe_steps} steps"
    rows = [row(f"probe {p.name}", f"{probe_budget}; {p.describe()}", probe_scores[p.name]) for p in settings.probes]
    main = RoutingProbe("main", settings.max_distance, settings.lr, settings.per_micro_batch,
                        settings.q_cross_warmup_steps)
    rows.append(row("R-CLA (main run)", f"{settings.steps} steps; {main.describe()}", main_scores["rcla"]))
    rows.append(row("normal (main run)", f"{settings.steps} steps; routing none, lr {settings.lr:g}",
                    main_scores["normal"]))
    return Table(f"routing probes: R-CLA fine-tunes at {probe_budget} x {settings.global_batch} x "
                 f"{settings.seq_len} tokens changing one knob each, then the main runs; loss in nats on the "
                 "held-out QA records (lower is better)", columns, rows)
