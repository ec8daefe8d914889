"""Inference cost of KV sharing across depth: cache bytes, time to first token and decode tokens/s at
retention every:1 / every:2 / every:4 (group size g = 1, 2, 4: every:g keeps layers 0, g, 2g, ..., ceil(L/g) of
the L layers: 100 / 50 / 25 % of the cache where g divides L; on the 6-layer demo shape every:4 keeps layers
{0, 4}, 33 %).

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
  python benchmarks/bench_inference.py --limit --threads 1      # the issue-14 table (demo shapes, both engines)
  python benchmarks/bench_inference.py --limit --threads 1 --large-decode   # + 24L d1024 at 2048x8 (slow)

Goals (issue 5): cache ratio exactly 1/g (|S|/L; exact when g divides L), TTFT(g)/TTFT(1) <= 1.00,
decode tok/s (g=4) / (g=1) >= 1.15.

--limit (issue 14) runs megakv's engine and transformers' generate path on the same weights, interleaved,
measures the single-thread read bandwidth in the same run (best of several sums over 1 GiB), and prints
per case: achieved / limit at every:1 (limit = bytes a decode step must read / bandwidth, where the bytes
are the weights the step reads, K/V projections of unread layers excluded, plus the K/V every layer
attends over), decode every:4 / every:1, TTFT every:4 / every:1, and megakv / transformers decode.
--decode-only fills the cache with random K/V instead of a timed prefill (decode cost does not depend on
the values), which is what makes the 24-layer 2048x8 case affordable on a small CPU.
Next to the bandwidth limit it prints a compute roof, also measured in the same run: matmul FLOPs of a
step / the rate of a batch-row matmul with its weight in cache (as the engine runs it), plus attention
FLOPs / the rate of one-token attention over an in-cache K/V. At 8 rows an fp32 matmul does 4 FLOP per
weight byte, so streaming weights at ~17 GB/s needs ~70 GFLOP/s, near one core's AVX2 peak: the matmul
kernels, not DRAM, bound the large batch-8 shape, and achieved/roof says how close the engine gets.
Rows `SHAPE/mkl` are megakv's engine with prepack=False (decode matmuls through F.linear / MKL, the
engine before megakv/inference/prepacked.py), and rows `SHAPE/sdpa` the engine with native_attention=False
(one-token attention through torch's SDPA, the engine before megakv/inference/native_attention.py), both
interleaved with the others for a same-run before/after.
"""

from __future__ import annotations

import argparse
import functools
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
def run_megakv(model: MegaKVModel, group: int, prompts: torch.Tensor, new_tokens: int, clock: Clock,
               decode_only: bool = False, prepack: bool = True, native_attention: bool = True) -> Run:
    """megakv's engine (one preallocated cache for the retained layers): prefill, then greedy decode.

    decode_only: the cache is filled with random K/V for the prompt's positions instead of a prefill.
    prepack=False: decode matmuls through F.linear (MKL) instead of oneDNN-prepacked weights (the engine
    before prepacking; megakv/inference/prepacked.py). native_attention=False: one-token attention through
    SDPA instead of the native kernel (megakv/inference/native_attention.py).
    """
    engine = InferenceEngine(model, f"every:{group}", prepack=prepack, native_attention=native_attention)
    batch, width = prompts.shape
    cache = engine.new_cache(batch, width + new_tokens)
    positions = model.default_positions(prompts)
    start = clock.now()
    if decode_only:
        for buffer in cache.buffers.values():
            buffer.normal_()
        cache.advance(width)
        token, ttft, steps = prompts[:, -1], (float("nan"), float("nan")), []
    else:
        token = engine.step(prompts, cache, positions)[:, -1].argmax(-1)
        ttft, steps = clock.since(start), []
    for i in range(new_tokens - 1):
        start = clock.now()
        position = torch.full((batch, 1), width + i, dtype=torch.long)
        token = engine.step(token[:, None], cache, position)[:, -1].argmax(-1)
        steps.append(clock.since(start))
    return Run(ttft, steps, cache.nbytes, cache.bytes_per_token, len(cache.retained))


@torch.no_grad()
def run_transformers(model: MegaKVModel, group: int, prompts: torch.Tensor, new_tokens: int, clock: Clock,
                     decode_only: bool = False) -> Run:
    """megakv's transformers wrapper (MegaKVForCausalLM on the same parameters, the SharedDepthCache that
    generate() gets from it), stepped as generate() steps it."""
    from megakv.hf.modeling import OUTPUT_CACHE_FIELD, hf_model_from_megakv

    if decode_only:
        raise ValueError("--decode-only is megakv-only (transformers' cache is filled by its own prefill)")
    wrapper = hf_model_from_megakv(model, f"every:{group}")
    start = clock.now()
    out = wrapper(input_ids=prompts, use_cache=True, logits_to_keep=1)
    cache, token = getattr(out, OUTPUT_CACHE_FIELD), out.logits[:, -1].argmax(-1)
    ttft, steps = clock.since(start), []
    for _ in range(new_tokens - 1):
        start = clock.now()
        token = wrapper(input_ids=token[:, None], past_key_values=cache, logits_to_keep=1).logits[:, -1].argmax(-1)
        steps.append(clock.since(start))
    nbytes = cache.bytes_held()
    return Run(ttft, steps, nbytes, nbytes // (prompts.shape[0] * cache.get_seq_length()), len(cache.retained))


@torch.no_grad()
def run_transformers_llama(model: MegaKVModel, group: int, prompts: torch.Tensor, new_tokens: int, clock: Clock,
                           decode_only: bool = False) -> Run:
    """transformers' own architecture (LlamaForCausalLM, ...) loaded with the same weights, with the
    DynamicCache its generate() uses (full cache: every layer its own K/V, so only g = 1)."""
    import transformers

    from megakv.hf.mapping import hf_config_from_model_config, state_dict_to_hf
    from megakv.hf.modeling import OUTPUT_CACHE_FIELD

    if group != 1 or decode_only:
        raise ValueError("the stock transformers model has no KV sharing: only g = 1, with its own prefill")
    hf_cfg = hf_config_from_model_config(model.cfg)
    hf_model = getattr(transformers, hf_cfg.architectures[0])(hf_cfg).to(model.embed.weight.dtype).eval()
    hf_model.load_state_dict(state_dict_to_hf(model.state_dict(), model.cfg), strict=False)
    cache = {OUTPUT_CACHE_FIELD: transformers.DynamicCache(config=hf_cfg)}  # the name this version takes
    start = clock.now()
    token = hf_model(input_ids=prompts, logits_to_keep=1, **cache).logits[:, -1].argmax(-1)
    ttft, steps = clock.since(start), []
    for _ in range(new_tokens - 1):
        start = clock.now()
        token = hf_model(input_ids=token[:, None], logits_to_keep=1, **cache).logits[:, -1].argmax(-1)
        steps.append(clock.since(start))
    layers = cache[OUTPUT_CACHE_FIELD].layers
    nbytes = sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)
    return Run(ttft, steps, nbytes, nbytes // (prompts.shape[0] * layers[0].get_seq_length()), len(layers))


def run_megakv_unpacked(model: MegaKVModel, group: int, prompts: torch.Tensor, new_tokens: int, clock: Clock,
                        decode_only: bool = False) -> Run:
    return run_megakv(model, group, prompts, new_tokens, clock, decode_only, prepack=False)


def run_megakv_sdpa(model: MegaKVModel, group: int, prompts: torch.Tensor, new_tokens: int, clock: Clock,
                    decode_only: bool = False) -> Run:
    return run_megakv(model, group, prompts, new_tokens, clock, decode_only, native_attention=False)


LABELS = {"megakv": "{shape}", "megakv-mkl": "{shape}/mkl", "megakv-sdpa": "{shape}/sdpa",
          "transformers": "{shape}/hf", "hf-stock": "{shape}/hf-stock"}  # row names
RUNNERS = {"megakv": run_megakv, "megakv-mkl": run_megakv_unpacked, "megakv-sdpa": run_megakv_sdpa,
           "transformers": run_transformers, "hf-stock": run_transformers_llama}
MEGAKV_VARIANTS = ("megakv", "megakv-sdpa", "megakv-mkl")


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
    model.reset_parameters(0)  # to_empty leaves memory uninitialised
    from megakv.model import rope_inverse_frequencies

    with torch.no_grad():
        model.rope.inv_freq.copy_(rope_inverse_frequencies(cfg))
    return model.to(dtype).eval()


def low_quantile(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[0] if len(values) >= 2 else values[0]


def run_case(model: MegaKVModel, shape: str, prompt_len: int, batch: int, groups: list[int], new_tokens: int,
             repeats: int, warmup: bool, engines: tuple[str, ...] = ("megakv",),
             decode_only: bool = False) -> list[Measurement]:
    """Every (engine, g) variant once per repeat, the order rotating each repeat."""
    cfg, clock = model.cfg, Clock()
    prompts = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
    variants = [(engine, g) for engine in engines for g in groups if engine != "hf-stock" or g == 1]
    runs: dict[tuple[str, int], list[Run]] = {v: [] for v in variants}
    peak: dict[tuple[str, int], float] = dict.fromkeys(variants, 0.0)
    if warmup:  # first calls pay one-off allocator / kernel selection costs
        for engine, g in variants:
            RUNNERS[engine](model, g, prompts[:, : min(prompt_len, 64)], 2, clock, decode_only)
    for r in range(repeats):
        for engine, g in variants[r % len(variants):] + variants[: r % len(variants)]:
            reset_peak_rss()
            runs[engine, g].append(RUNNERS[engine](model, g, prompts, new_tokens, clock, decode_only))
            peak[engine, g] = max(peak[engine, g], peak_rss_mb())
    rows = []
    for engine, g in variants:
        done = runs[engine, g]
        last = done[-1]
        ttft_wall = [1000 * run.ttft[0] for run in done]
        ttft_cpu = [1000 * run.ttft[1] for run in done]
        step_wall = [step[0] for run in done for step in run.steps]
        step_cpu = [step[1] for run in done for step in run.steps]
        rows.append(Measurement(
            LABELS[engine].format(shape=shape), prompt_len, batch, g, last.retained, cfg.n_layers,
            last.cache_bytes, last.cache_bytes_per_token, min(ttft_cpu), batch / low_quantile(step_cpu),
            min(ttft_wall), batch / low_quantile(step_wall), statistics.median(ttft_wall),
            batch / statistics.median(step_wall), peak[engine, g], ttft_cpu, ttft_wall,
            [1000 * t for t in step_cpu], [1000 * t for t in step_wall]))
    return rows


def measure_read_bandwidth(mib: int = 1024, repeats: int = 7) -> float:
    """Single-thread read bandwidth, bytes per CPU-second: best of `repeats` sums over `mib` MiB (far
    beyond the caches). Run with torch at 1 thread, as the engine is measured."""
    data = torch.ones(mib * 2**18)
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        data.sum()
        best = min(best, time.thread_time() - start)
    return data.nbytes / best


def decode_step_bytes(model: MegaKVModel, group: int, batch: int, context: int) -> int:
    """Bytes one decode step must read: every weight it uses once (embedding rows only for the batch; the
    K/V projections of layers whose K/V nobody reads are skipped) plus the K/V of `context` positions that
    each of the n_layers attends over."""
    cfg = model.cfg
    retained = set(range(0, cfg.n_layers, group))
    element = model.embed.weight.element_size()
    weights = 0
    for name, p in model.named_parameters():
        if name.startswith("embed."):
            weights += batch * p.shape[1] if model.lm_head is not None else p.numel()
            continue
        parts = name.split(".")
        if parts[0] == "layers" and parts[3] in ("k_proj", "v_proj") and int(parts[1]) not in retained:
            continue
        weights += p.numel()
    kv = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.resolved_head_dim * batch * context
    return (weights + kv) * element


def decode_matmuls(model: MegaKVModel, group: int) -> list[torch.Tensor]:
    """The weight matrices one decode step multiplies by (embedding lookup excluded, K/V projections of unread
    layers skipped)."""
    cfg = model.cfg
    retained = set(range(0, cfg.n_layers, group))
    weights = []
    for name, p in model.named_parameters():
        parts = name.split(".")
        if name.startswith("embed.") and model.lm_head is not None or p.dim() < 2:
            continue
        if parts[0] == "layers" and parts[3] in ("k_proj", "v_proj") and int(parts[1]) not in retained:
            continue
        weights.append(p)
    return weights


def decode_attention_flops(model: MegaKVModel, batch: int, context: int) -> int:
    """q.k plus p.v over `context` positions for every query head of every layer."""
    cfg = model.cfg
    return 4 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * context * batch


@dataclass
class ComputeRates:
    """FLOP/s of the decode step's kernels on this core with their operands in cache (no DRAM traffic)."""
    matmul: dict[tuple[str, int, int], float]  # (engine, out, in) -> batch-row matmul as that engine runs it
    attention: dict[str, float]  # engine -> one-token attention (GQA folded) over 256 cached positions
    peak: float  # a 512^3 fp32 GEMM: what the core does when a matmul is not starved of rows

    def roof_s(self, engine: str, weights: list[torch.Tensor], batch: int, attention_flops: int) -> float:
        """Compute roof of a step: each weight's FLOPs at its in-cache rate, plus attention at its rate."""
        matmuls = "megakv-mkl" if engine == "megakv-mkl" else "megakv"  # megakv-sdpa prepacks as megakv does
        matmul = sum(2 * batch * w.numel() / self.matmul[(matmuls, *rate_shape(w))] for w in weights)
        return matmul + attention_flops / self.attention[engine]


def rate_shape(weight: torch.Tensor) -> tuple[int, int]:
    """The shape a weight's rate is measured on: vocabulary-sized ones capped at 4096 rows (still wide enough
    for the same kernel, small enough to stay in the last-level cache)."""
    return min(weight.shape[0], 4096), weight.shape[1]


def best_rate(flops: float, fn, calls: int = 20, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(calls):
            fn()
        best = min(best, time.thread_time() - start)
    return flops * calls / best


@torch.no_grad()
def measure_compute_rates(model: MegaKVModel, batch: int) -> ComputeRates:
    """The compute roof's rates for one batch size (see ComputeRates); 1 thread, operands in cache. megakv
    runs a weight as its engine does (prepacked when wide enough, megakv/inference/prepacked.py), megakv-mkl
    through F.linear."""
    from megakv.inference.native_attention import DecodeAttentionKernel
    from megakv.inference.prepacked import MIN_PACKED_OUT, PackedWeight, prepacking_available

    cfg = model.cfg
    dtype = model.embed.weight.dtype
    matmul = {}
    for shape in dict.fromkeys(rate_shape(w) for w in decode_matmuls(model, 1)):
        weight, x = torch.randn(*shape, dtype=dtype), torch.randn(batch, shape[1], dtype=dtype)
        flops = 2 * batch * weight.numel()
        plain = functools.partial(torch.nn.functional.linear, x, weight)
        wide = shape[0] >= MIN_PACKED_OUT and prepacking_available(weight)
        matmul[("megakv", *shape)] = best_rate(flops, functools.partial(PackedWeight().linear, x, weight) if wide
                                               else plain)
        matmul[("megakv-mkl", *shape)] = best_rate(flops, plain)
    groups, hd = cfg.n_heads // cfg.n_kv_heads, cfg.resolved_head_dim
    q = torch.randn(batch, cfg.n_kv_heads, groups, hd, dtype=dtype)
    k, v = (torch.randn(batch, cfg.n_kv_heads, 256, hd, dtype=dtype) for _ in range(2))
    attention_flops = 4 * batch * cfg.n_heads * hd * 256
    sdpa = best_rate(attention_flops, lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
    kernel = DecodeAttentionKernel.load()
    native = sdpa if kernel is None or dtype != torch.float32 else best_rate(attention_flops, lambda: kernel(q, k, v))
    attention = {"megakv": native, "megakv-mkl": native, "megakv-sdpa": sdpa}
    a, b = torch.randn(512, 512, dtype=dtype), torch.randn(512, 512, dtype=dtype)
    peak = best_rate(2 * 512**3, lambda: torch.mm(a, b), calls=5)
    return ComputeRates(matmul, attention, peak)


def l3_bytes() -> int | None:
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index3/size") as f:
            text = f.read().strip()
        return int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text)
    except (OSError, ValueError, IndexError):
        return None


def print_limit_table(rows: list[Measurement], step_bytes: dict[tuple[str, int, int, int], int], bandwidth: float,
                      new_tokens: int, roofs: dict[tuple[str, int, int, int, str], float]) -> None:
    """The issue-14 table: one line per (shape, prompt, batch, megakv variant)."""
    print(f"\nsingle-thread read bandwidth (measured in this run): {bandwidth / 1e9:.1f} GB/s; decode = "
          f"10th-percentile step CPU time; limit = bytes per step / bandwidth; roof = each weight's matmul "
          f"FLOPs / its batch-B rate as the engine runs it + attention FLOPs / the attention rate, in cache"
          f" (mean context prompt + {new_tokens // 2})")
    header = (f"{'shape':<11}{'prompt x batch':>15}{'MB/step g1':>11}{'ms/step g1':>11}{'limit ms':>9}"
              f"{'roof ms':>8}{'achieved/limit g1':>18}{'g4':>6}{'achieved/roof g1':>17}"
              f"{'decode g4/g1':>13}{'TTFT g4/g1':>11}{'megakv/hf decode g1':>20}{'TTFT hf/megakv':>15}")
    print(header)
    print("-" * len(header))
    index = {(m.shape, m.prompt_len, m.batch, m.group): m for m in rows}
    cases = sorted({(m.shape.split("/")[0], m.prompt_len, m.batch) for m in rows})
    ratio = lambda a, b: a / b if a is not None and b else None  # noqa: E731

    def fmt(value: float | None, width: int, digits: int = 2) -> str:
        return f"{value:>{width}.{digits}f}" if value is not None and value == value else f"{'-':>{width}}"

    for shape, prompt_len, batch in cases:
        hf = index.get((f"{shape}/hf-stock", prompt_len, batch, 1))
        for engine in MEGAKV_VARIANTS:
            label = LABELS[engine].format(shape=shape)
            mk = {g: index.get((label, prompt_len, batch, g)) for g in (1, 4)}
            if mk[1] is None:
                continue
            limit_ms = {g: 1000 * step_bytes[shape, prompt_len, batch, g] / bandwidth for g in (1, 4)}
            roof_ms = 1000 * roofs[shape, prompt_len, batch, 1, engine]
            step_ms = {g: 1000 * batch / m.decode_tokens_per_s for g, m in mk.items() if m}
            print(f"{label:<11}{f'{prompt_len} x {batch}':>15}"
                  f"{step_bytes[shape, prompt_len, batch, 1] / 1e6:>11.1f}{step_ms[1]:>11.1f}{limit_ms[1]:>9.1f}"
                  f"{roof_ms:>8.1f}{fmt(limit_ms[1] / step_ms[1], 18)}{fmt(ratio(limit_ms[4], step_ms.get(4)), 6)}"
                  f"{fmt(roof_ms / step_ms[1], 17)}"
                  f"{fmt(ratio(mk[4] and mk[4].decode_tokens_per_s, mk[1].decode_tokens_per_s), 13)}"
                  f"{fmt(ratio(mk[4] and mk[4].ttft_ms, mk[1].ttft_ms), 11)}"
                  f"{fmt(ratio(mk[1].decode_tokens_per_s, hf and hf.decode_tokens_per_s), 20)}"
                  f"{fmt(ratio(hf and hf.ttft_ms, mk[1].ttft_ms), 15)}")


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
                        help="megakv's engine (preallocated cache), megakv's transformers wrapper (the cache "
                             "generate() gets from it), or hf-stock: transformers' own Llama/Qwen class on the same "
                             "weights with its DynamicCache (g = 1 only)")
    parser.add_argument("--engines", nargs="+", choices=sorted(RUNNERS), default=None,
                        help="several engines, interleaved in one run (overrides --engine)")
    parser.add_argument("--decode-only", action="store_true",
                        help="fill the cache with random K/V instead of a timed prefill (megakv only; no TTFT)")
    parser.add_argument("--limit", action="store_true",
                        help="the issue-14 table: both engines on the demo shape (512x1, 512x8, 2048x8) and the "
                             "large one (512x1), g = 1 and 4, against the read bandwidth measured in this run")
    parser.add_argument("--large-decode", action="store_true",
                        help="with --limit: also the 24-layer d1024 shape at 2048x8, decode only (slow)")
    parser.add_argument("--json", default=None, help="also write the measurements here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # before --limit, which checks that it runs on one thread
    if args.limit:
        return limit_run(args)
    if args.quick:
        args.shapes, args.prompt_lens, args.batches, args.new_tokens, args.repeats = ["demo"], [512], [1, 8], 32, 5
    if 1 not in args.groups:
        args.groups = [1, *args.groups]  # ratios are against g=1
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
                                not args.no_warmup, tuple(args.engines or [args.engine]), args.decode_only)
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


def limit_run(args: argparse.Namespace) -> int:
    """--limit: every case of the issue-14 table in one run, then the table."""
    if torch.get_num_threads() != 1:
        raise SystemExit("--limit compares with the single-thread read bandwidth: pass --threads 1")
    # (shape, prompt, batch, engines, decode_only); megakv-mkl / megakv-sdpa: the engine without prepacked decode
    # weights / without the native decode attention
    both = (*MEGAKV_VARIANTS, "hf-stock")
    cases = [("demo", 512, 1, both, False), ("demo", 512, 8, both, False), ("demo", 2048, 8, both, False),
             ("large", 512, 1, both, False)]
    if args.large_decode:
        cases.append(("large", 2048, 8, MEGAKV_VARIANTS, True))
    bandwidth = measure_read_bandwidth()
    print(f"torch {torch.__version__}, 1 thread (thread CPU time), {os.cpu_count()} cores, dtype {args.dtype}, "
          f"{args.new_tokens} new tokens, {args.repeats} interleaved repeats; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; load average {os.getloadavg()[0]:.1f}", flush=True)
    rows: list[Measurement] = []
    step_bytes: dict[tuple[str, int, int, int], int] = {}
    roofs: dict[tuple[str, int, int, int, str], float] = {}
    kv_layer_bytes: dict[tuple[str, int, int], int] = {}
    for shape in dict.fromkeys(case[0] for case in cases):
        model = build_model(shape, DTYPES[args.dtype], max(c[1] for c in cases if c[0] == shape) + args.new_tokens)
        for _, prompt_len, batch, engines, decode_only in (c for c in cases if c[0] == shape):
            start = time.perf_counter()
            case = run_case(model, shape, prompt_len, batch, [1, 4], args.new_tokens, args.repeats,
                            not args.no_warmup, engines, decode_only)
            rows.extend(case)
            context = prompt_len + args.new_tokens // 2
            rates = measure_compute_rates(model, batch)
            for g in (1, 4):
                step_bytes[shape, prompt_len, batch, g] = decode_step_bytes(model, g, batch, context)
                for engine in MEGAKV_VARIANTS:
                    roofs[shape, prompt_len, batch, g, engine] = rates.roof_s(
                        engine, decode_matmuls(model, g), batch, decode_attention_flops(model, batch, context))
            cfg = model.cfg
            kv_layer_bytes[shape, prompt_len, batch] = (2 * cfg.n_kv_heads * cfg.resolved_head_dim * batch * context
                                                        * model.embed.weight.element_size())
            print_table(case)
            flops = sum(2 * batch * w.numel() for w in decode_matmuls(model, 1))
            flops += decode_attention_flops(model, batch, context)
            print(f"  compute rates in cache (GFLOP/s), matmul at {batch} rows (out x in: megakv / mkl): "
                  + ", ".join(f"{o}x{i}: {rates.matmul['megakv', o, i] / 1e9:.1f} / "
                              f"{rates.matmul['megakv-mkl', o, i] / 1e9:.1f}"
                              for (engine, o, i) in rates.matmul if engine == "megakv")
                  + f"; attention native {rates.attention['megakv'] / 1e9:.1f} / sdpa "
                  f"{rates.attention['megakv-sdpa'] / 1e9:.1f}; fp32 peak (512^3 GEMM) {rates.peak / 1e9:.1f}; "
                  f"decode FLOPs g1 {flops / 1e9:.2f} G (at peak {1000 * flops / rates.peak:.1f} ms)")
            print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
        del model
    bandwidth_after = measure_read_bandwidth()
    print(f"\nread bandwidth after the run: {bandwidth_after / 1e9:.1f} GB/s (the limit uses the higher one); load "
          f"average {os.getloadavg()[0]:.1f}")
    print_limit_table(rows, step_bytes, max(bandwidth, bandwidth_after), args.new_tokens, roofs)
    l3 = l3_bytes()
    print("\nevery:4 / every:1: layers sharing K/V read it one after another (each layer's queries need the layer "
          "before), so the shared K/V can only be re-read from cache if one layer's K/V plus a layer's weights fit "
          f"in the last-level cache ({'unknown' if l3 is None else f'{l3 / 2**20:.0f} MiB'} L3 here, shared by "
          "every process on the machine):")
    for (shape, prompt_len, batch), nbytes in kv_layer_bytes.items():
        print(f"  {shape} {prompt_len} x {batch}: one layer's K/V {nbytes / 2**20:.1f} MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv[1:], "bandwidth": [bandwidth, bandwidth_after],
                       "rows": [asdict(m) for m in rows],
                       "step_bytes": {"/".join(map(str, k)): v for k, v in step_bytes.items()},
                       "roof_s": {"/".join(map(str, k)): v for k, v in roofs.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
