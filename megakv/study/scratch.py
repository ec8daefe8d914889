"""Models trained from scratch for the pre-training sweep and the ablation: settings per scale, data, runs.

Both parts train the same small decoder on the same data, token budget and sample order, changing only
the routing strategy (or the depth, for the shallow full-cache baselines), and score every model on the
same held-out tokens at each retention. A scale is a frozen dataclass: `tiny` (seconds, tests), `cpu`
(the default on a 2-core machine), `gpu` (the documented settings of a real run; not run by the tests).

Data: `cpu`/`gpu` use the real mix of `megakv-data mix` (Linux and Python docs, Brown, Shakespeare,
Milton; ~15M training tokens with an 8k tokenizer), prepared once into OUT/data/mix and shared by both
parts. `tiny` builds a small corpus from the running interpreter's standard-library sources (real text
that is always there, no download) into OUT/data/stdlib-tiny.
"""

from __future__ import annotations

import json
import sysconfig
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from omegaconf import OmegaConf

from megakv import recipes
from megakv.data.preprocess import preprocess
from megakv.data.recipes import prepare_corpus, read_sources
from megakv.data.tokenizer import train_sentencepiece
from megakv.model_paths import resolve_model
from megakv.routing import deployment_plan
from megakv.study.runs import (
    Trainings,
    is_finished,
    retention_losses,
    scale_settings_of,
    torch_threads,
    train_run,
    training_time,
)
from megakv.train.run_dir import write_json_atomically

Log = Callable[[str], None]
RETAINS = ("every:1", "every:2", "every:3", "every:4")
BASE_SEED = 1234  # train.seed (initialisation) and routing.seed of every model; repeats count up from it
TRAIN_SECONDS_FILE = "train_seconds.json"
WALL_FILE = "training_wall.json"


@dataclass(frozen=True)
class ScratchModel:
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    seq_len: int


@dataclass(frozen=True)
class ScratchScale:
    name: str
    corpus: str  # mix (megakv-data mix) | stdlib (tiny: the interpreter's own sources)
    vocab_size: int  # tokenizer pieces; the model's vocab is this rounded up to a multiple of 64
    model: ScratchModel
    q_sweep: tuple[float, ...]  # q_cross of the deep models; 0 is trained with routing "none"
    reference_q: float  # the R-CLA model the ablation compares against (one of q_sweep)
    steps: int
    global_batch: int
    micro_batch: int
    lr: float
    warmup_steps: int
    eval_tokens_per_source: int  # held-out tokens scored per data source (the loss is their mean)
    seed_repeats: int = 0  # extra trainings of the reference model with other seeds: the spread is the noise floor
    concurrent_runs: int = 2  # trainings at once (one process each)
    threads_per_run: int = 1
    precision: str = "fp32"  # train.precision
    # checkpoint.every (0: steps // 2). A save of the cpu model (2.7M parameters, 57 MB with its optimizer)
    # took 0.13-0.26 s against ~0.75 s a step: every 50 steps costs ~0.5% and a crash redoes at most 50 steps
    # (~40 s), not 400 (~5 min). (A stopped or killed study has its trainings save anyway: runs.py.)
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if self.reference_q not in self.q_sweep or self.reference_q <= 0:
            raise ValueError(f"reference_q {self.reference_q} must be a positive value of q_sweep {self.q_sweep}")
        if 0.0 not in self.q_sweep:
            raise ValueError(f"q_sweep {self.q_sweep} needs 0 (the normally trained model)")

    @property
    def tokens_per_model(self) -> int:
        return self.steps * self.global_batch * self.model.seq_len

    def describe(self) -> dict[str, str]:
        m = self.model
        return {"model": f"{m.n_layers} layers, d_model {m.d_model}, {m.n_heads} heads ({m.n_kv_heads} K/V), "
                         f"ffn {m.ffn_hidden}, seq {m.seq_len}, vocab {self.vocab_size}",
                "training": f"{self.steps} steps x {self.global_batch} x {m.seq_len} tokens = "
                            f"{self.tokens_per_model:,} tokens per model, lr {self.lr:g} (warm-up "
                            f"{self.warmup_steps}, cosine to 10%), AdamW (0.9, 0.99), wd 0.1, clip 1.0, "
                            f"{self.precision}",
                "data": {"mix": "megakv-data mix (Linux + Python docs, Brown, Shakespeare, Milton)",
                         "stdlib": "the interpreter's standard-library sources (tiny scale)"}[self.corpus],
                "held-out": f"first {self.eval_tokens_per_source:,} tokens of each source's held-out split, "
                            f"loss = mean over sources",
                "schedule": f"{self.concurrent_runs} trainings at once, {self.threads_per_run} thread each"}


SCALES = {
    "tiny": ScratchScale(
        name="tiny", corpus="stdlib", vocab_size=320,
        model=ScratchModel(n_layers=4, d_model=32, n_heads=2, n_kv_heads=2, ffn_hidden=64, seq_len=32),
        q_sweep=(0.0, 0.5), reference_q=0.5, steps=3, global_batch=4, micro_batch=4, lr=3e-3, warmup_steps=1,
        eval_tokens_per_source=512, seed_repeats=1),
    # ~0.75 s a step at one thread on an otherwise idle 2-core machine, two trainings at once: ~10 min a deep
    # model. 800 steps (1.6M tokens): at 200 the models were still near unigram loss (~6.2) and sharing
    # barely mattered to any of them, so nothing about routing could be read off.
    "cpu": ScratchScale(
        name="cpu", corpus="mix", vocab_size=8192,
        model=ScratchModel(n_layers=8, d_model=128, n_heads=4, n_kv_heads=4, ffn_hidden=352, seq_len=128),
        q_sweep=(0.0, 0.25, 0.5, 0.75), reference_q=0.5, steps=800, global_batch=16, micro_batch=16, lr=2e-3,
        warmup_steps=40, eval_tokens_per_source=4096, seed_repeats=2, checkpoint_every=50),
    # A real run (documented, not run here): 28 layers like the paper's model (~90M parameters), one GPU
    # (train.device auto), 33M tokens per model: about 2 epochs of the mix's ~15M training tokens, so a run
    # that wants the paper's Chinchilla-sized budget needs a larger corpus (data.datasets).
    "gpu": ScratchScale(
        name="gpu", corpus="mix", vocab_size=8192,
        model=ScratchModel(n_layers=28, d_model=512, n_heads=8, n_kv_heads=8, ffn_hidden=1408, seq_len=1024),
        q_sweep=(0.0, 0.25, 0.5, 0.75), reference_q=0.5, steps=2000, global_batch=16, micro_batch=16, lr=1e-3,
        warmup_steps=100, eval_tokens_per_source=65536, seed_repeats=2, concurrent_runs=1, threads_per_run=8,
        precision="bf16", checkpoint_every=125),
}


def scale_settings(scale: str) -> ScratchScale:
    return scale_settings_of(SCALES, scale)


# ----------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class StudyData:
    train: tuple[str, ...]  # dataset prefixes
    held_out: dict[str, str]  # source name -> held-out prefix
    tokenizer: str
    sources: str = ""  # the packages and versions the text came from, for the report


def described(settings: ScratchScale, data: StudyData) -> dict[str, str]:
    """The settings a report states, the data's package versions included."""
    description = settings.describe()
    if data.sources:
        description["data"] += f"; {data.sources}"
    return description


def _mix_data(root: Path, vocab_size: int, log: Log) -> StudyData:
    data_yaml = root / "data.yaml"
    if not data_yaml.is_file():
        log(f"preparing the real mix into {root} (megakv-data mix; minutes: fetch, tokenizer, tokenize)")
        prepare_corpus("mix", root, vocab_size=vocab_size, progress=False)
    data = OmegaConf.load(data_yaml).data
    held_out = {Path(p).name.removesuffix("_valid"): str(p) for p in data.valid_datasets}
    recorded = read_sources(root)
    sources = (", ".join(dict.fromkeys(recorded.values())) if recorded
               else "package versions not recorded (prepared before megakv recorded them)")
    return StudyData(tuple(str(p) for p in data.datasets), held_out, str(data.tokenizer), sources)


def stdlib_documents(max_chars: int) -> list[str]:
    """The first `max_chars` characters of the standard library's top-level modules, one document each."""
    docs, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(text)
            total += len(text)
        if total >= max_chars:
            break
    return docs


def _stdlib_data(root: Path, vocab_size: int, log: Log) -> StudyData:
    train, valid, tokenizer = root / "stdlib_train", root / "stdlib_valid", root / "tokenizer"
    if not Path(f"{valid}.idx").is_file():
        log(f"preparing the tiny stdlib corpus into {root}")
        docs = stdlib_documents(400_000)
        splits = {"train": [d for i, d in enumerate(docs) if i % 10], "valid": docs[::10]}
        root.mkdir(parents=True, exist_ok=True)
        train_sentencepiece(splits["train"], tokenizer, vocab_size, character_coverage=0.98)
        for name, prefix in (("train", train), ("valid", valid)):
            raw = root / "raw" / f"{name}.jsonl"
            raw.parent.mkdir(parents=True, exist_ok=True)
            raw.write_text("".join(json.dumps({"text": d}) + "\n" for d in splits[name]))
            preprocess([str(raw)], tokenizer, prefix, progress=False, overwrite=True)
    return StudyData((str(train),), {"stdlib": str(valid)}, str(tokenizer))


def prepare_data(study_dir: Path, settings: ScratchScale, log: Log) -> StudyData:
    """The part's data, prepared once under OUT/data/ and shared by the parts that train from scratch."""
    if settings.corpus == "mix":
        return _mix_data(study_dir / "data" / "mix", settings.vocab_size, log)
    return _stdlib_data(study_dir / "data" / "stdlib-tiny", settings.vocab_size, log)


# ----------------------------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class ScratchRun:
    """One model: a routing strategy (and q_cross) at a depth; everything else comes from the scale."""

    name: str
    run_dir: Path
    strategy: str  # none | rcla | cla:K | rdcla:K
    q_cross: float
    n_layers: int
    seed: int = BASE_SEED  # initialisation and routing draws; the data order is the same for every run

    def overrides(self, settings: ScratchScale, data: StudyData) -> list[str]:
        m = settings.model
        vocab = -(-settings.vocab_size // 64) * 64
        return [
            f"model.vocab_size={vocab}", f"model.d_model={m.d_model}", f"model.n_layers={self.n_layers}",
            f"model.n_heads={m.n_heads}", f"model.n_kv_heads={m.n_kv_heads}", f"model.ffn_hidden={m.ffn_hidden}",
            f"model.max_seq_len={m.seq_len}",
            f"routing.strategy={self.strategy}", f"routing.q_cross={self.q_cross}", f"routing.seed={self.seed}",
            f"train.seed={self.seed}",
            f"data.datasets=[{','.join(data.train)}]", "data.weights=null", "data.valid_datasets=[]",
            "data.valid_fraction=0.0", f"data.tokenizer={data.tokenizer}", f"data.seed={BASE_SEED}",
            f"optim.lr={settings.lr}", "optim.min_lr_ratio=0.1", f"optim.warmup_steps={settings.warmup_steps}",
            "optim.schedule=cosine", "optim.beta1=0.9", "optim.beta2=0.99", "optim.weight_decay=0.1",
            "optim.grad_clip=1.0",
            f"train.steps={settings.steps}", f"train.global_batch={settings.global_batch}",
            f"train.micro_batch={settings.micro_batch}", f"train.precision={settings.precision}",
            "parallel.zero_stage=2",
            f"checkpoint.every={settings.checkpoint_every or max(1, settings.steps // 2)}", "checkpoint.keep_last=1",
            "validation.every=0", f"logging.log_every={max(1, settings.steps // 10)}", "logging.tensorboard=false",
        ]


def held_out_loss(run_dir: Path, data: StudyData, settings: ScratchScale, retains: Sequence[str],
                  log: Log) -> dict[str, float]:
    """Mean over the data's sources of the held-out loss at each retention (each source weighs the same)."""
    per_source = [retention_losses(run_dir, prefix, retains, max_tokens=settings.eval_tokens_per_source,
                                   seq_len=settings.model.seq_len, log=log) for prefix in data.held_out.values()]
    return {r: sum(s[r] for s in per_source) / len(per_source) for r in retains}


def train_and_score(runs: Sequence[ScratchRun], settings: ScratchScale, data: StudyData, *,
                    retains_of: Callable[[ScratchRun], Sequence[str]], log: Log,
                    trainings: Trainings | None = None) -> dict[str, dict[str, float]]:
    """Train every run (cached, resumable; `concurrent_runs` at once, longest first), then score it.

    Returns {run name: {retain: held-out loss}}. Each run keeps its training seconds over every invocation
    that trained it (runs.training_time).
    """
    config = recipes.path("demo")  # every field that matters is overridden by ScratchRun.overrides

    def one(run: ScratchRun) -> dict[str, float]:
        start = time.perf_counter()
        train_run(config, run.run_dir, run.overrides(settings, data), log=log, threads=settings.threads_per_run,
                  trainings=trainings)
        losses = held_out_loss(run.run_dir, data, settings, retains_of(run), log)
        log(f"{run.name}: done in {time.perf_counter() - start:.0f} s; " +
            ", ".join(f"{r} {v:.4f}" for r, v in losses.items()))
        return losses

    ordered = sorted(runs, key=lambda r: -r.n_layers)  # the deep ones first: the shallow ones fill the gaps
    with torch_threads(settings.threads_per_run):  # scoring runs beside the other training
        pool = ThreadPoolExecutor(max_workers=settings.concurrent_runs)
        try:
            futures = {run.name: pool.submit(one, run) for run in ordered}
            results = {name: future.result() for name, future in futures.items()}
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            pool.shutdown(wait=True)
    return {run.name: results[run.name] for run in runs}


def training_seconds(directory: Path) -> dict[str, float]:
    """Per-model seconds a study recorded in the part's train_seconds.json before each run kept its own."""
    path = directory / TRAIN_SECONDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def budget_note(run: ScratchRun, settings: ScratchScale) -> str:
    """Tokens per parameter of a trained model, against the paper's budget (34B tokens for 1.7B, ~20)."""
    model, _ = resolve_model(run.run_dir)
    params = sum(p.numel() for p in model.parameters())
    return (f"Budget: {settings.tokens_per_model:,} training tokens for {params / 1e6:.2f}M parameters "
            f"({run.name}) = {settings.tokens_per_model / params:.2g} tokens per parameter; the paper trains "
            f"34B tokens for 1.7B (~20, Chinchilla), so these models are far earlier in training.")


def seed_repeats(run: ScratchRun, count: int) -> list[ScratchRun]:
    """`run` trained again with the next `count` seeds (initialisation and routing), beside it."""
    return [replace(run, name=f"{run.name}-seed{run.seed + i}", run_dir=run.run_dir.with_name(
        f"{run.run_dir.name}-seed{run.seed + i}"), seed=run.seed + i) for i in range(1, count + 1)]


def seed_spread(by_seed: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Per retention, how far apart the seeds' losses are: max / min - 1 (0 with one seed)."""
    retains = next(iter(by_seed.values())).keys()
    return {r: max(v[r] for v in by_seed.values()) / min(v[r] for v in by_seed.values()) - 1 for r in retains}


def seed_note(label: str, by_seed: Mapping[int, Mapping[str, float]]) -> str:
    """What retraining one model with other seeds did: the noise floor the differences between models face."""
    if len(by_seed) < 2:
        return "One training seed per model and no seed repeats at this scale: the seed noise is not measured."
    spread = seed_spread(by_seed)
    scores = ", ".join(f"seed {seed} {losses['every:1']:.4f}" for seed, losses in sorted(by_seed.items()))
    return (f"Seed noise: the {label} model trained with {len(by_seed)} seeds (initialisation and routing; same "
            f"data order) scored {scores} at full cache; spread (max / min - 1) "
            + ", ".join(f"{r} {100 * v:.1f}%" for r, v in spread.items())
            + ". Every other model has one seed, so differences between models smaller than this are noise.")


def unfinished(runs: Sequence[ScratchRun]) -> list[str]:
    return [run.name for run in runs if not is_finished(run.run_dir)]


def timing_note(part_dir: Path, runs: Sequence[ScratchRun], wall: float, trained: Sequence[str]) -> str:
    """How long the part's trainings took when they ran (kept in part_dir, so a cached rerun still says it)."""
    path = part_dir / WALL_FILE
    if trained:
        write_json_atomically(path, {"seconds": round(wall, 1), "trained": list(trained)})
    record = json.loads(path.read_text()) if path.is_file() else None
    per_model, spans = [], False
    for run in runs:  # seconds over every invocation that trained the model (an interrupted one resumed later)
        seconds, invocations = training_time(run.run_dir, training_seconds(run.run_dir.parent).get(run.name))
        spans |= invocations > 1
        per_model.append(f"{run.name} {seconds:.0f}" + (f" ({invocations} invocations)" if invocations > 1 else
                                                        " (span of its metrics)" if invocations == 0 else ""))
    text = "Training and scoring took "
    text += (f"{record['seconds'] / 60:.1f} min of wall time (models trained then: {', '.join(record['trained'])})"
             if record else "an unrecorded time (every model came from the cache)")
    text += "; per model (s, one thread each): " + ", ".join(per_model)
    if spans:
        text += ("; a model trained over several invocations of the study (stopped, then resumed) counts the "
                 "seconds of each, so the wall time above covers only the last")
    return text


def retained_layers(spec: str, n_layers: int) -> int:
    return len(deployment_plan(spec, n_layers).retained)


def plot_lines(path: Path, title: str, xlabel: str, ylabel: str, lines: dict[str, tuple[list, list]],
               markers: dict[str, tuple[list, list]] | None = None, invert_x: bool = False) -> str:
    """A PNG of loss curves (`lines`) and single models (`markers`); returns the file name."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.4, 4.4))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for label, (xs, ys) in lines.items():
        axes.plot(xs, ys, marker="o", label=label)
    for label, (xs, ys) in (markers or {}).items():
        axes.scatter(xs, ys, marker="s", s=60, zorder=3, label=label)
    if invert_x:
        axes.invert_xaxis()
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))  # never over a point
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path.name
