"""Inference cost of KV sharing across depth: cache bytes, time to first token and decode tokens/s at
retention 100 / 50 / 25 % (group size g = 1, 2, 4: every:g keeps layers 0, g, 2g, ...).

For each model shape x prompt length x batch size, the g values are run interleaved (the order rotates
every repeat, so drift in machine load hits all of them alike). Each phase is timed twice: wall clock,
and CPU time of the process (with --threads 1, the compute thread's CPU time). On a shared machine the
CPU time is the robust figure (another process taking the core does not inflate it); the wall-clock
ratios are printed beside it. TTFT is the lowest over the repeats; decode tokens/s comes from a low
quantile (10th percentile) of all decode steps pooled over the repeats (every step does the same work,
so the fast ones are the uncontended cost). The JSON holds medians and every raw value too. Peak
process memory (RSS high-water mark) is reset before and read after each run where Linux allows it.
Models have random weights: only cost is measured. Decoding is greedy, prompts are unpadded.

  python benchmarks/bench_inference.py --quick            # demo shape, prompt 512, batch 1 and 8
  python benchmarks/bench_inference.py                    # the full grid (slow on 2 CPU cores)
  python benchmarks/bench_inference.py --shapes large --prompt-lens 512 --batches 1 --json out.json

Goals (issue 5): cache ratio exactly 1/g (|S|/L; exact when g divides L), TTFT(g)/TTFT(1) <= 1.00,
decode tok/s (g=4) / (g=1) >= 1.15.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

from megakv.config.model import ModelConfig
from megakv.inference.engine import InferenceEngine
from megakv.model import MegaKVModel

SHAPES = {
    # The demo model of the recipe (6 layers, d=256, 4 heads).
    "demo": dict(vocab_size=8192, d_model=256, n_layers=6, n_heads=4, n_kv_heads=4, ffn_hidden=704),
    # A larger GQA shape: 24 layers, d=1024, 16 query heads sharing 4 KV heads.
    "large": dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=4, ffn_hidden=2816),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Measurement:
    shape: str
    prompt_len: int
    batch: int
    group: int
    retained: int
    n_layers: int
    cache_bytes: int
    cache_bytes_per_token: int
    ttft_ms: float  # CPU time, lowest over repeats
    decode_tokens_per_s: float  # CPU time, whole batch, from the 10th-percentile step
    ttft_wall_ms: float
    decode_wall_tokens_per_s: float
    ttft_median_wall_ms: float
    decode_median_wall_tokens_per_s: float
    peak_rss_mb: float  # max over repeats (process high-water mark during the run)
    ttft_cpu_all_ms: list[float]
    ttft_wall_all_ms: list[float]
    step_cpu_ms: list[float]  # every decode step of every repeat
    step_wall_ms: list[float]


class Clock:
    """Wall time and CPU time together. CPU time is the calling thread's when torch runs single-threaded
    (all compute is on it), else the whole process's."""

    def __init__(self):
        self.cpu = time.thread_time if torch.get_num_threads() == 1 else time.process_time

    def now(self) -> tuple[float, float]:
        return time.perf_counter(), self.cpu()

    def since(self, start: tuple[float, float]) -> tuple[float, float]:
        wall, cpu = self.now()
        return wall - start[0], cpu - start[1]


@dataclass
class Run:
    ttft: tuple[float, float]  # (wall s, cpu s)
    steps: list[tuple[float, float]]
    cache_bytes: int
    cache_bytes_per_token: int
    retained: int


@torch.no_grad()
def run_megakv(model: MegaKVModel, group: int, prompts: torch.Tensor, new_tokens: int, clock: Clock) -> Run:
    """megakv's engine (one preallocated cache for the retained layers): prefill, then greedy decode."""
    engine = InferenceEngine(model, f"every:{group}")
    batch, width = prompts.shape
    cache = engine.new_cache(batch, width + new_tokens)
    positions = model.default_positions(prompts)
    start = clock.now()
    token = engine.step(prompts, cache, positions)[:, -1].argmax(-1)
    ttft, steps = clock.since(start), []
    for i in range(new_tokens - 1):
        start = clock.now()
        position = torch.full((batch, 1), width + i, dtype=torch.long)
        token = engine.step(token[:, None], cache, position)[:, -1].argmax(-1)
        steps.append(clock.since(start))
    return Run(ttft, steps, cache.nbytes, cache.bytes_per_token, len(cache.retained))


@torch.no_grad()
def run_transformers(model: MegaKVModel, group: int, prompts: torch.Tensor, new_tokens: int, clock: Clock) -> Run:
    """The transformers wrapper with the DynamicCache generate() uses (grown by concatenation each step)."""
    from transformers import DynamicCache

    from megakv.hf.modeling import hf_model_from_megakv

    wrapper = hf_model_from_megakv(model, f"every:{group}")
    cache = DynamicCache(config=wrapper.config)
    start = clock.now()
    token = wrapper(input_ids=prompts, past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
    ttft, steps = clock.since(start), []
    for _ in range(new_tokens - 1):
        start = clock.now()
        token = wrapper(input_ids=token[:, None], past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
        steps.append(clock.since(start))
    stored = [layer for layer in cache.layers if layer.keys is not None]
    nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in stored)
    per_token = nbytes // (prompts.shape[0] * cache.get_seq_length())
    return Run(ttft, steps, nbytes, per_token, len(stored))


RUNNERS = {"megakv": run_megakv, "transformers": run_transformers}


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark for this process (Linux >= 4.0); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_model(shape: str, dtype: torch.dtype, max_len: int) -> MegaKVModel:
    cfg = ModelConfig(**SHAPES[shape], max_seq_len=max_len)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = MegaKVModel(cfg)
    model.to_empty(device="cpu")
    model.reset_parameters()  # to_empty leaves memory uninitialised
    from megakv.model import rope_inverse_frequencies

    with torch.no_grad():
        model.rope.inv_freq.copy_(rope_inverse_frequencies(cfg))
    return model.to(dtype).eval()


def low_quantile(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[0] if len(values) >= 2 else values[0]


def run_case(model: MegaKVModel, shape: str, prompt_len: int, batch: int, groups: list[int], new_tokens: int,
             repeats: int, warmup: bool, engine: str = "megakv") -> list[Measurement]:
    cfg, runner, clock = model.cfg, RUNNERS[engine], Clock()
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    runs: dict[int, list[Run]] = {g: [] for g in groups}
    peak: dict[int, float] = dict.fromkeys(groups, 0.0)
    if warmup:  # first calls pay one-off allocator / kernel selection costs
        for g in groups:
            runner(model, g, prompts[:, : min(prompt_len, 64)], 2, clock)
    for r in range(repeats):
        order = groups[r % len(groups):] + groups[: r % len(groups)]
        for g in order:
            reset_peak_rss()
            runs[g].append(runner(model, g, prompts, new_tokens, clock))
            peak[g] = max(peak[g], peak_rss_mb())
    rows = []
    for g in groups:
        last = runs[g][-1]
        ttft_wall = [1000 * run.ttft[0] for run in runs[g]]
        ttft_cpu = [1000 * run.ttft[1] for run in runs[g]]
        step_wall = [step[0] for run in runs[g] for step in run.steps]
        step_cpu = [step[1] for run in runs[g] for step in run.steps]
        rows.append(Measurement(
            shape if engine == "megakv" else f"{shape}/hf", prompt_len, batch, g, last.retained, cfg.n_layers,
            last.cache_bytes, last.cache_bytes_per_token, min(ttft_cpu), batch / low_quantile(step_cpu),
            min(ttft_wall), batch / low_quantile(step_wall), statistics.median(ttft_wall),
            batch / statistics.median(step_wall), peak[g], ttft_cpu, ttft_wall, [1000 * t for t in step_cpu],
            [1000 * t for t in step_wall]))
    return rows


def print_table(rows: list[Measurement]) -> None:
    header = (f"{'shape':<9}{'prompt':>7}{'batch':>6}{'g':>3}{'|S|/L':>7}{'cache MB':>10}{'ratio':>7}"
              f"{'TTFT ms':>9}{'ratio':>7}{'wall':>7}{'decode tok/s':>13}{'ratio':>7}{'wall':>7}{'peak RSS MB':>12}")
    print(header)
    print("-" * len(header))
    base: dict[tuple, Measurement] = {}
    for m in rows:
        key = (m.shape, m.prompt_len, m.batch)
        if m.group == 1:
            base[key] = m
        b = base.get(key)

        def ratio(value: float, reference: float | None) -> float:
            return value / reference if reference else float("nan")

        print(f"{m.shape:<9}{m.prompt_len:>7}{m.batch:>6}{m.group:>3}{f'{m.retained}/{m.n_layers}':>7}"
              f"{m.cache_bytes / 2**20:>10.2f}{ratio(m.cache_bytes, b and b.cache_bytes):>7.3f}"
              f"{m.ttft_ms:>9.1f}{ratio(m.ttft_ms, b and b.ttft_ms):>7.3f}"
              f"{ratio(m.ttft_wall_ms, b and b.ttft_wall_ms):>7.3f}"
              f"{m.decode_tokens_per_s:>13.1f}{ratio(m.decode_tokens_per_s, b and b.decode_tokens_per_s):>7.3f}"
              f"{ratio(m.decode_wall_tokens_per_s, b and b.decode_wall_tokens_per_s):>7.3f}"
              f"{m.peak_rss_mb:>12.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="demo shape, prompt 512, batch 1 and 8, 32 new tokens, 5 repeats")
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["demo", "large"])
    parser.add_argument("--prompt-lens", nargs="+", type=int, default=[512, 2048])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--groups", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per run (decode steps + 1)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--no-warmup", action="store_true")
    parser.add_argument("--engine", choices=sorted(RUNNERS), default="megakv",
                        help="megakv's engine (preallocated cache), or the transformers wrapper with the "
                             "DynamicCache that generate() uses")
    parser.add_argument("--json", default=None, help="also write the measurements here")
    args = parser.parse_args(argv)
    if args.quick:
        args.shapes, args.prompt_lens, args.batches, args.new_tokens, args.repeats = ["demo"], [512], [1, 8], 32, 5
    if 1 not in args.groups:
        args.groups = [1, *args.groups]  # ratios are against g=1
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = "thread CPU time" if torch.get_num_threads() == 1 else "process CPU time"
    print(f"engine {args.engine}, torch {torch.__version__}, {torch.get_num_threads()} threads ({clock}), "
          f"{os.cpu_count()} cores, dtype {args.dtype}, {args.new_tokens} new tokens, {args.repeats} repeats, "
          f"peak-RSS reset {'on' if reset_peak_rss() else 'off'}")
    rows: list[Measurement] = []
    for shape in args.shapes:
        model = build_model(shape, DTYPES[args.dtype], max(args.prompt_lens) + args.new_tokens)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"# {shape}: {model.cfg.n_layers} layers, d={model.cfg.d_model}, heads {model.cfg.n_heads}/"
              f"{model.cfg.n_kv_heads}, {params:.1f}M parameters", flush=True)
        for prompt_len in args.prompt_lens:
            for batch in args.batches:
                start = time.perf_counter()
                case = run_case(model, shape, prompt_len, batch, sorted(args.groups), args.new_tokens, args.repeats,
                                not args.no_warmup, args.engine)
                rows.extend(case)
                print_table(case)
                print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
        del model
    print("\nsummary")
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "threads": torch.get_num_threads(),
                       "rows": [asdict(m) for m in rows]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
