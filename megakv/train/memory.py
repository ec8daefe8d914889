"""A launch-time estimate of one micro-batch's activation memory, against what this machine has.

Rough on purpose (the usual per-layer count of saved tensors, Korthikanti et al. 2022, plus the logits):
it exists to refuse a config that cannot fit at all (model.max_seq_len=100000 by mistake) before any
process starts, not to plan a tight one. Two figures: with a fused attention kernel (no T x T scores kept)
and with the plain one (scores kept per layer); only the first can refuse, the second warns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from megakv.config import MegaKVConfig
from megakv.config.devices import device_type, gpu_index

WARN_FRACTION = 0.5


@dataclass(frozen=True)
class ActivationEstimate:
    fused_bytes: int  # attention without materialised scores (flash / memory-efficient kernels)
    plain_bytes: int  # attention scores and probabilities kept for the backward pass
    available_bytes: int  # this rank's share of the machine (GPU memory, or RAM / ranks on the node)
    where: str


def _bytes_per_value(cfg: MegaKVConfig) -> int:
    return 2 if cfg.train.precision == "bf16" else 4


def _machine_bytes(cfg: MegaKVConfig, local_rank: int) -> tuple[int, str]:
    if device_type(cfg.train.device) == "cuda" and torch.cuda.is_available():
        index = gpu_index(local_rank)
        return torch.cuda.get_device_properties(index).total_memory, f"GPU {index}"
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // max(1, ranks_here), f"RAM / {ranks_here} rank(s) on this machine"


def estimate(cfg: MegaKVConfig, local_rank: int = 0) -> ActivationEstimate:
    m, value = cfg.model, _bytes_per_value(cfg)
    seq = cfg.data.seq_len or m.max_seq_len
    batch = cfg.train.micro_batch
    layers = -(-m.n_layers // cfg.parallel.pipeline)  # a pipeline stage holds its share of the layers
    per_layer = batch * seq * (10 * m.d_model + 3 * m.ffn_hidden) * value  # inputs of every matmul, norms, SwiGLU
    scores = 2 * batch * m.n_heads * seq * seq * value  # scores + probabilities
    logits = 3 * batch * seq * m.vocab_size * 4  # fp32 logits, softmax, its gradient
    available, where = _machine_bytes(cfg, local_rank)
    if cfg.train.activation_checkpointing:  # each block keeps its input; one block is recomputed at a time
        fused = layers * batch * seq * m.d_model * value + per_layer + logits
        return ActivationEstimate(fused, fused + scores, available, where)
    fused = layers * per_layer + logits
    return ActivationEstimate(fused, fused + layers * scores, available, where)


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_activation_memory(cfg: MegaKVConfig, local_rank: int = 0) -> str | None:
    """Refuse a micro-batch whose activations cannot fit; a warning (returned) when they may not."""
    from megakv.config.errors import ConfigError

    est = estimate(cfg, local_rank)
    seq = cfg.data.seq_len or cfg.model.max_seq_len
    field = "data.seq_len" if cfg.data.seq_len else "model.max_seq_len"
    if est.fused_bytes > est.available_bytes:
        raise ConfigError(field, seq, f"one micro-batch (train.micro_batch={cfg.train.micro_batch} x {seq} tokens) "
                          f"needs about {_gib(est.fused_bytes)} of activations, more than the "
                          f"{_gib(est.available_bytes)} this rank has ({est.where})",
                          "lower train.micro_batch or the sequence length (or use more pipeline stages)")
    if est.plain_bytes > WARN_FRACTION * est.available_bytes:
        return (f"one micro-batch may need up to {_gib(est.plain_bytes)} of activations when the attention kernel "
                f"keeps its {seq}x{seq} scores ({_gib(est.fused_bytes)} with a fused kernel), against "
                f"{_gib(est.available_bytes)} on this rank ({est.where}); lower train.micro_batch or {field} if the "
                "first steps run out of memory or crawl")
    return None
