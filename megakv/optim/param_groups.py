"""Weight-decay groups: matrices are decayed; norms and biases never are; embeddings by choice."""

from __future__ import annotations

from torch import nn

from megakv.config.optim import OptimConfig


def is_decayed(name: str, ndim: int, cfg: OptimConfig) -> bool:
    if ndim < 2:  # RMSNorm weights and biases
        return False
    if name.startswith("embed.") or name.startswith("lm_head."):
        return cfg.decay_embeddings
    return True


def weight_decay_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            ndim = len(getattr(param, "ds_shape", param.shape))  # a ZeRO-3 partition is flat; ds_shape is whole
            (decay if is_decayed(name, ndim, cfg) else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]
