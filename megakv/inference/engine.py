"""Prefill and incremental decode with a KV cache shared across depth.

Deployment rule: a plan retains a set S of layers; layer l attends with its own queries to the K/V of
mu(l) = the nearest retained layer at or below l. A retained layer projects its K/V for the new
positions, writes them into its cache slot and attends to the whole cached prefix. A layer outside S
never runs its K/V projections: it attends to the prefix K/V its source produced earlier in the same
step. Prefill therefore does no extra work and the cache is |S|/L of a full one.

Elastic retention (`InferenceEngine.set_retain`, `generate(shrink_at=...)`): because a retained layer's
cache holds every position, a live generation can move from S to any S' subset of S between two steps.
What it then computes, exactly: every position written before the switch keeps the K/V it was given
under S (layer j's K/V of a prefix token are the projections of that token's layer-j hidden state as
computed under S); every later position runs under S' (layer l attends with its queries to the K/V of
mu_{S'}(l), the nearest layer of S' at or below l, over ALL positions so far: the prefix ones made under
S, then its own). Nothing is recomputed; the dropped layers' buffers are freed at the switch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from megakv.inference.cache import RetainedKVCache, kv_bytes_per_token
from megakv.inference.decode_view import decode_view
from megakv.inference.native_attention import DecodeAttentionKernel
from megakv.inference.padding import attention_mask, left_pad, positions_from_valid
from megakv.inference.prepacked import MIN_PACKED_OUT, PackedWeight, prepacking_available
from megakv.inference.sampling import SamplingConfig, sample_next_token
from megakv.model import KV, MegaKVModel
from megakv.routing import RoutingPlan, deployment_plan

# extend(layer, kv of the new positions) -> kv of the whole prefix (a cache write), or None without a cache.
ExtendKV = Callable[[int, KV], KV]


def resolve_plan(retain: str | Sequence[int] | RoutingPlan, n_layers: int) -> RoutingPlan:
    """`every:K`, `all`, `0,3,5`, a list of retained layers, or a ready RoutingPlan."""
    if isinstance(retain, RoutingPlan):
        if retain.n_layers != n_layers:
            raise ValueError(f"routing plan has {retain.n_layers} layers, the model has {n_layers}")
        return retain
    return deployment_plan(retain, n_layers)


def forward_layers(model: MegaKVModel, plan: RoutingPlan, x: torch.Tensor, position_ids: torch.Tensor,
                   attn_mask: torch.Tensor | None, extend: ExtendKV | None) -> torch.Tensor:
    """Hidden states (batch, q_len, d_model) after the last layer, for the embedded new tokens `x`.

    With `extend`, every layer whose K/V some layer reads (plan.kv_needed, i.e. the retained set) stores
    its new K/V through it; other layers skip their K/V projections entirely.
    """
    return model.run_layers(x, position_ids, plan, attn_mask, extend_kv=extend)


def check_shrink(current: Sequence[int], new: Sequence[int]) -> None:
    """A live cache can only lose layers: S' must be a subset of S (a dropped layer's K/V are gone)."""
    missing = sorted(set(new) - set(current))
    if missing:
        raise ValueError(f"cannot move retention from {list(current)} to {list(new)}: layers {missing} hold no "
                         f"cache (their K/V were never kept), so a live generation can only drop layers; choose a "
                         f"subset of {list(current)}")


@dataclass(frozen=True)
class RetainChange:
    after_tokens: int  # new tokens generated under the previous set when the switch happened
    retained: tuple[int, ...]  # the set from then on
    cache_bytes_before: int
    cache_bytes_after: int


@dataclass
class GenerationStats:
    retained: tuple[int, ...]  # the set generation started with (see retain_changes)
    batch: int
    prompt_tokens: int  # longest prompt (padded width)
    new_tokens: int  # decode steps taken, including the token produced by prefill
    cache_bytes: int  # allocated for the whole batch and every position (at the start, before any shrink)
    cache_bytes_per_token: int  # per sequence: 2 * |S| * n_kv_heads * head_dim * element size
    ttft_s: float  # prefill + first token
    decode_s: float  # the remaining new_tokens - 1 steps
    decode_step_s: list[float] = field(default_factory=list, repr=False)  # each decode step (for robust stats)
    retain_changes: list[RetainChange] = field(default_factory=list)  # elastic shrinks, in order
    # Tokens the decode steps gave rows still generating (None: every row ran every step). A row that stopped
    # at eos still rides along in the batch; its steps are not tokens anyone gets.
    decode_tokens: int | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second over the whole batch, after each row's first token."""
        tokens = self.batch * (self.new_tokens - 1) if self.decode_tokens is None else self.decode_tokens
        return tokens / self.decode_s if tokens > 0 and self.decode_s > 0 else float("nan")


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # new tokens per prompt (ending with eos when it stopped on eos)
    finish_reasons: list[str]  # "eos" or "length"
    stats: GenerationStats
    first_logits: torch.Tensor | None = field(default=None, repr=False)  # (batch, vocab) at the last prompt token


class InferenceEngine:
    """Generation from a MegaKVModel under one deployment plan.

    The engine serves the model's module tree as it was when the engine was built: its parameters may change
    later (trained in place, or replaced by load_state_dict(..., assign=True)), but a submodule replaced
    afterwards (an adapter wrapped around a layer, say) needs a new engine."""

    def __init__(self, model: MegaKVModel, retain: str | Sequence[int] | RoutingPlan = "all", prepack: bool = True,
                 native_attention: bool = True):
        """prepack: run decode-sized matmuls on weights prepacked once (CPU fp32: faster decode for batches of
        2-64, one more copy of the linear weights in memory; megakv/inference/prepacked.py). Same numbers.
        native_attention: run one-token attention through the native kernel (CPU fp32, compiled on first use;
        megakv/inference/native_attention.py); SDPA where it does not apply or cannot be built. Same numbers."""
        self.model = model.eval()
        self.plan = resolve_plan(retain, model.cfg.n_layers)
        weight = model.embed.weight
        use_kernel = native_attention and weight.device.type == "cpu" and weight.dtype == torch.float32
        self.attention_kernel = DecodeAttentionKernel.load() if use_kernel else None
        self._runner = decode_view(self.model, prepack, self.attention_kernel)
        output = self.model.output_weight()
        packs_output = prepack and prepacking_available(output) and output.shape[0] >= MIN_PACKED_OUT
        self._output_weight = PackedWeight() if packs_output else None

    @property
    def retained(self) -> tuple[int, ...]:
        return self.plan.retained

    def set_retain(self, retain: str | Sequence[int] | RoutingPlan, cache: RetainedKVCache | None = None) -> None:
        """Move from the current retained set S to S' (a subset of S) between two steps; see the module doc.

        With `cache` (the live one, holding S), the dropped layers' buffers are freed now and the following
        `step` calls continue the same sequences under S' with no recomputation.
        """
        new_plan = resolve_plan(retain, self.model.cfg.n_layers)
        check_shrink(self.retained, new_plan.retained)
        if cache is not None:
            if cache.retained != self.retained:
                raise ValueError(f"the cache holds layers {list(cache.retained)}, the engine retains "
                                 f"{list(self.retained)}: pass the cache this engine has been filling")
            cache.drop_layers(new_plan.retained)
        self.plan = new_plan

    def shrink_schedule(self, shrink_at: Sequence[tuple[int, str | Sequence[int] | RoutingPlan]],
                        max_new_tokens: int) -> list[tuple[int, RoutingPlan]]:
        """Validate `shrink_at` [(after N new tokens, retain), ...]: N increasing in [1, max_new_tokens), each
        set a subset of the one before (starting from the engine's)."""
        schedule, previous_n, previous = [], 0, self.plan
        for n, retain in shrink_at:
            if not previous_n < n < max_new_tokens:
                raise ValueError(f"shrink after {n} new tokens: the points must increase and lie in "
                                 f"[1, max_new_tokens={max_new_tokens}) (after {previous_n} so far), or it "
                                 f"never happens")
            plan = resolve_plan(retain, self.model.cfg.n_layers)
            check_shrink(previous.retained, plan.retained)
            schedule.append((n, plan))
            previous_n, previous = n, plan
        return schedule

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.embed.weight.device

    def new_cache(self, batch: int, max_len: int) -> RetainedKVCache:
        return RetainedKVCache(self.model.cfg, self.retained, batch, max_len, self.dtype, self.device)

    @torch.no_grad()
    def step(self, input_ids: torch.Tensor, cache: RetainedKVCache, position_ids: torch.Tensor,
             key_valid: torch.Tensor | None = None, last_only: bool = True) -> torch.Tensor:
        """Run new tokens (batch, q_len) through the model, appending to `cache`; return their logits.

        key_valid: (batch, cache.length + q_len), False at padding; None when nothing is padded.
        """
        mask = attention_mask(key_valid, input_ids.shape[1])
        hidden = forward_layers(self._runner, self.plan, self.model.embed(input_ids), position_ids, mask,
                                cache.extend)
        cache.advance(input_ids.shape[1])
        return self._head(hidden[:, -1:] if last_only else hidden)

    def _head(self, hidden: torch.Tensor) -> torch.Tensor:
        """model.head, with the output matmul on the prepacked weight where there is one."""
        if self._output_weight is None:
            return self.model.head(hidden)
        return self._output_weight.linear(self.model.norm(hidden), self.model.output_weight())

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingConfig | None = None, eos_id: int | Sequence[int] | None = None,
                 pad_id: int = 0,
                 shrink_at: Sequence[tuple[int, str | Sequence[int] | RoutingPlan]] = ()) -> GenerationOutput:
        """Generate up to `max_new_tokens` per prompt (left-padded into one batch); stop a prompt at `eos_id`
        (one id, or several that all end a sequence, as a model config's eos_token_id list).

        shrink_at: [(N, S'), ...]: the first N new tokens come from the current set, then `set_retain(S')`
        (elastic retention); the engine's own set is restored when generation ends.
        """
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not 0 <= pad_id < self.model.cfg.vocab_size:  # padded positions are masked, but still embedded
            raise ValueError(f"pad_id {pad_id} lies outside the model's vocabulary [0, {self.model.cfg.vocab_size}): "
                             "pass any id inside it (padded positions are never attended to)")
        schedule = self.shrink_schedule(shrink_at, max_new_tokens)
        initial_plan = self.plan
        try:
            stop = () if eos_id is None else tuple(eos_id) if isinstance(eos_id, Sequence) else (int(eos_id),)
            return self._generate(prompts, max_new_tokens, sampling, stop, pad_id, schedule)
        finally:
            self.plan = initial_plan

    def _wait_for_device(self) -> None:
        """GPU kernels run asynchronously: timings read before they finish would time their launch only."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: SamplingConfig | None,
                  stop: tuple[int, ...], pad_id: int, schedule: list[tuple[int, RoutingPlan]]) -> GenerationOutput:
        sampling = sampling or SamplingConfig()
        generator = sampling.generator(self.device)
        ids, valid = left_pad(prompts, pad_id, self.device)
        batch, width = ids.shape
        span = width + max_new_tokens - 1  # the last new token is returned, never run through the model
        cache = self.new_cache(batch, span)
        initial_retained, changes = self.retained, []
        # Validity of every key column the generation will have, so a step only slices it (no allocation).
        all_valid = None
        if not bool(valid.all()):
            all_valid = torch.ones(batch, span, dtype=torch.bool, device=self.device)
            all_valid[:, :width] = valid
        key_valid = None if all_valid is None else all_valid[:, :width]
        positions = positions_from_valid(valid)

        start = time.perf_counter()
        first_logits = self.step(ids, cache, positions, key_valid)[:, -1]
        token = sample_next_token(first_logits, sampling, generator)
        self._wait_for_device()
        ttft = time.perf_counter() - start

        out: list[list[int]] = [[] for _ in range(batch)]
        finished = torch.zeros(batch, dtype=torch.bool, device=self.device)
        stop_ids = torch.tensor(stop, dtype=torch.long, device=self.device)
        next_position = positions[:, -1] + 1
        decode_start, steps, step_times = time.perf_counter(), 1, []
        while True:
            for row in (~finished).nonzero().flatten().tolist():
                out[row].append(int(token[row]))
            if stop:
                finished |= torch.isin(token, stop_ids)
            if bool(finished.all()) or steps == max_new_tokens:
                break
            if schedule and schedule[0][0] == steps:
                before = cache.nbytes
                self.set_retain(schedule.pop(0)[1], cache)
                changes.append(RetainChange(steps, self.retained, before, cache.nbytes))
            if all_valid is not None:
                key_valid = all_valid[:, :width + steps]
            step_start = time.perf_counter()
            logits = self.step(token[:, None], cache, next_position[:, None], key_valid)[:, -1]
            token = sample_next_token(logits, sampling, generator)
            self._wait_for_device()
            step_times.append(time.perf_counter() - step_start)
            next_position = next_position + 1
            steps += 1
        decode_s = time.perf_counter() - decode_start

        reasons = ["eos" if seq and seq[-1] in stop else "length" for seq in out]
        first = changes[0].cache_bytes_before if changes else cache.nbytes
        stats = GenerationStats(retained=initial_retained, batch=batch, prompt_tokens=width, new_tokens=steps,
                                cache_bytes=first, cache_bytes_per_token=kv_bytes_per_token(
                                    self.model.cfg, len(initial_retained), self.dtype),
                                ttft_s=ttft, decode_s=decode_s, decode_step_s=step_times, retain_changes=changes,
                                decode_tokens=sum(max(0, len(seq) - 1) for seq in out))
        return GenerationOutput(out, reasons, stats, first_logits)
