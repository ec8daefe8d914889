"""The megakv decoder: a Llama / Mistral / Qwen2 / Qwen3-style transformer whose attention layers take
their K/V from a *source layer* chosen by a routing plan (megakv/routing.py).

Reading guide
  RMSNorm, rotary embeddings (RoPE), SwiGLU MLP, grouped-query attention via
  torch.nn.functional.scaled_dot_product_attention. Layer l computes its queries from its own input;
  its K/V come from layer plan[l]. K/V are a layer's own projections of its own input after k-norm and
  RoPE (exactly what a KV cache holds). A layer computes its K/V only when some layer reads them, so a
  routed layer that nobody reads skips its K/V projections. Gradients from layer l flow into the K/V
  projections of its source layer.

One per-layer step, `run_block`, holds the routing rule: given the K/V bank `live` of earlier layers
that layer i or a later one reads (exactly `crossing(plan, i)` in megakv/routing.py), it runs layer i
and leaves in `live` what layers after i read. The dense forward, the inference cache and the pipeline
stages (megakv/parallel/pipeline.py) all chain this one step, so a stage that starts at layer c only
needs the hidden state and `live` of the stage before it.

The module tree is embed -> layers.{i} -> norm -> lm_head with index-keyed names. Every weight's initial
value is a function of (seed, its name) alone (`init_weights`), so a pipeline stage that builds only
its own layers starts from the dense model's weights. There are no parallelism calls in this file;
megakv/parallel/ wraps it from the outside.
"""

from __future__ import annotations

import functools
import math
import zlib
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from megakv.config.model import ModelConfig
from megakv.routing import RoutingPlan

KV = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (batch, n_kv_heads, seq, head_dim)
Rope = tuple[torch.Tensor, torch.Tensor]  # (cos, sin), each (batch, seq, head_dim)
LiveKV = dict[int, KV]  # source layer -> its K/V, for the earlier layers that a current or later layer reads


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 for stability under bf16, then return to the input dtype (as HF does).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.resolved_head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaling = cfg.rope_scaling
    if scaling.type == "llama3":
        # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, the middle blended.
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = torch.where(medium, blended, scaled)
    return inv_freq.float()


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) / .half() cast every floating buffer; the frequencies stay fp32 (as in
        # transformers): rounded to bf16's 8 mantissa bits, they shift the angles of late positions by radians.
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = inv_freq.to(self.inv_freq.device, torch.float32)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> Rope:
        freqs = position_ids[..., None].float() * self.inv_freq  # (batch, seq, head_dim / 2)
        angles = torch.cat([freqs, freqs], dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim). Half-split rotation, the layout of HF Llama/Qwen weights."""
    cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.out_bias)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None

    def _heads(self, x: torch.Tensor, norm: RMSNorm | None) -> torch.Tensor:
        batch, seq, _ = x.shape
        # -1: the head count follows the projection's width (a tensor-parallel rank holds fewer heads).
        x = x.view(batch, seq, -1, self.head_dim)
        if norm is not None:
            x = norm(x)
        return x.transpose(1, 2)

    def project_q(self, h: torch.Tensor, rope: Rope) -> torch.Tensor:
        return apply_rope(self._heads(self.q_proj(h), self.q_norm), rope)

    def project_kv(self, h: torch.Tensor, rope: Rope) -> KV:
        k = apply_rope(self._heads(self.k_proj(h), self.k_norm), rope)
        v = self._heads(self.v_proj(h), None)
        return k, v

    def attend(self, q: torch.Tensor, kv: KV, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q: (batch, heads, q_len, head_dim); kv over k_len >= q_len positions ending at the query's.

        attn_mask (bool, True = may attend, broadcastable to (batch, heads, q_len, k_len)) overrides the
        default causal mask; pass one when the batch has padding.
        """
        k, v = kv
        q_len, k_len = q.shape[2], k.shape[2]
        if attn_mask is None and q_len > 1:
            if q_len == k_len:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
            else:  # queries are the last q_len positions: bottom-right aligned causal mask
                attn_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        elif q_len == 1 and k.shape[1] < q.shape[1]:
            # Decode under GQA: a K/V head's query heads become its query rows, so one plain attention per
            # K/V head reads its K/V once (faster than enable_gqa's per-query-head kernel).
            batch, heads, _, head_dim = q.shape
            grouped = q.view(batch, k.shape[1], heads // k.shape[1], head_dim)
            out = F.scaled_dot_product_attention(grouped, k, v, attn_mask=attn_mask).view(batch, heads, 1, head_dim)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
        batch, _, seq, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, rope: Rope, shared_kv: KV | None = None,
                attn_mask: torch.Tensor | None = None, project_own_kv: bool = True,
                extend_kv: Callable[[KV], KV] | None = None) -> tuple[torch.Tensor, KV | None]:
        """Returns (output, this layer's own K/V or None when it did not project them).

        shared_kv=None: the layer attends with its own K/V. Otherwise it attends to `shared_kv`, and
        projects its own K/V only if `project_own_kv` (a later layer reads them). `extend_kv` (e.g. a
        cache append) turns the own K/V of the new positions into those of the full sequence.
        """
        h = self.attn_norm(x)
        q = self.attn.project_q(h, rope)
        own_kv = None
        if shared_kv is None or project_own_kv:
            own_kv = self.attn.project_kv(h, rope)
            if extend_kv is not None:
                own_kv = extend_kv(own_kv)
        x = x + self.attn.attend(q, own_kv if shared_kv is None else shared_kv, attn_mask)
        x = x + self.mlp(self.mlp_norm(x))
        return x, own_kv


def run_block(block: Block, index: int, x: torch.Tensor, rope: Rope, plan: RoutingPlan, live: LiveKV,
              attn_mask: torch.Tensor | None = None, extend_kv: Callable[[int, KV], KV] | None = None,
              keep_kv: frozenset[int] = frozenset()) -> torch.Tensor:
    """Run layer `index` with the K/V it reads; keep in `live` what later layers read. Returns its output.

    On entry `live` holds the K/V of every layer j < index with plan.last_reader[j] >= index; on return
    it holds those with last_reader[j] >= index + 1 (this layer's own K/V added when a later layer reads
    them, K/V that no later layer reads dropped, so activation memory follows the plan).
    `extend_kv(layer, kv)`, when given, turns the K/V a layer projects into those it attends with (an
    inference cache appends the new positions and returns the whole cached sequence).
    `keep_kv`: layers that project their K/V even when nobody reads them, tied to the output with weight
    zero, so their projections get an exact zero gradient instead of none (replicas that train different
    plans in one step then hold gradients for the same parameters). The output is unchanged.
    """
    source = plan[index]
    shared = None if source == index else live[source]
    extend = None if extend_kv is None else functools.partial(extend_kv, index)
    unread_but_kept = index in keep_kv and not plan.kv_needed[index]
    x, own_kv = block(x, rope, shared, attn_mask, project_own_kv=plan.kv_needed[index] or unread_but_kept,
                      extend_kv=extend)
    if unread_but_kept:
        x = x + 0.0 * (own_kv[0].sum() + own_kv[1].sum())
    if plan.last_reader[index] > index:
        live[index] = own_kv
    if source != index and plan.last_reader[source] == index:
        del live[source]
    return x


def _seeded_generator(seed: int, name: str) -> torch.Generator:
    """A generator for one named weight: the same (seed, name) gives the same values in any build."""
    mixed = np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(mixed[0]) << 32 | int(mixed[1]))


def _seeded_normal_(weight: torch.Tensor, std: float, seed: int, name: str) -> None:
    """Fill `weight` from its own CPU generator; drawn on the CPU and copied for a weight on another device (a
    CUDA tensor cannot draw from a CPU generator), so a model built on a GPU starts from the same values."""
    generator = _seeded_generator(seed, name)
    if weight.device.type == "cpu":
        weight.normal_(0.0, std, generator=generator)
    else:
        weight.copy_(torch.empty(weight.shape, dtype=weight.dtype).normal_(0.0, std, generator=generator))


def init_weights(module: nn.Module, prefix: str, cfg: ModelConfig, seed: int) -> None:
    """Initialise `module`, named `prefix` inside a MegaKVModel, as the whole model would be with `seed`."""
    std = cfg.init_std
    # GPT-2 style: residual-branch outputs are scaled down with depth to keep activations stable.
    residual_std = std / math.sqrt(2 * cfg.n_layers)
    for local_name, sub in module.named_modules():
        name = f"{prefix}.{local_name}" if local_name else prefix
        if isinstance(sub, nn.Linear):
            is_residual_out = name.endswith("o_proj") or name.endswith("down_proj")
            with torch.no_grad():
                _seeded_normal_(sub.weight, residual_std if is_residual_out else std, seed, name + ".weight")
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            with torch.no_grad():
                _seeded_normal_(sub.weight, std, seed, name + ".weight")
        elif isinstance(sub, RMSNorm):
            nn.init.ones_(sub.weight)


class MegaKVModel(nn.Module):
    def __init__(self, cfg: ModelConfig, init_seed: int | None = None):
        """init_seed=None draws the seed from torch's global generator (torch.manual_seed still decides)."""
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if self.embed.weight.is_meta:  # built on the meta device to be loaded into: nothing to initialise
            return
        if init_seed is None:
            init_seed = int(torch.randint(0, 2**31 - 1, ()))
        self.reset_parameters(init_seed)

    def reset_parameters(self, seed: int) -> None:
        for name, child in self.named_children():
            init_weights(child, name, self.cfg, seed)

    def output_weight(self) -> torch.Tensor:
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.norm(x), self.output_weight())

    def default_positions(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        seq = input_ids.shape[1]
        positions = torch.arange(offset, offset + seq, device=input_ids.device)
        return positions.unsqueeze(0).expand(input_ids.shape[0], seq)

    def forward(self, input_ids: torch.Tensor, plan: RoutingPlan | None = None,
                position_ids: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                keep_kv: frozenset[int] = frozenset()) -> torch.Tensor:
        """Logits (batch, seq, vocab) for token ids (batch, seq) under a routing plan (default: own K/V)."""
        if plan is None:
            plan = RoutingPlan.own(self.cfg.n_layers)
        if plan.n_layers != self.cfg.n_layers:
            raise ValueError(f"routing plan has {plan.n_layers} layers, the model has {self.cfg.n_layers}")
        if position_ids is None:
            position_ids = self.default_positions(input_ids)
        return self.head(self.run_layers(self.embed(input_ids), position_ids, plan, attn_mask, keep_kv=keep_kv))

    def run_layers(self, x: torch.Tensor, position_ids: torch.Tensor, plan: RoutingPlan,
                   attn_mask: torch.Tensor | None = None, extend_kv: Callable[[int, KV], KV] | None = None,
                   keep_kv: frozenset[int] = frozenset()) -> torch.Tensor:
        """Hidden states after the last layer for embedded tokens `x` (batch, seq, d_model); see run_block."""
        rope = self.rope(position_ids, x.dtype)
        live: LiveKV = {}
        for index, layer in enumerate(self.layers):
            x = run_block(layer, index, x, rope, plan, live, attn_mask, extend_kv, keep_kv)
        return x

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
