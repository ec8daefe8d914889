"""Document boundaries inside packed samples (Megatron's --reset-attention-mask / --reset-position-ids).

Samples are cut from a stream of documents, each ended by an end-of-document (EOD) token, so one sample
usually holds the end of one document and the start of the next. By default a token attends to every
earlier token of the sample, across documents. With `data.reset_attention_mask` a token attends only to
its own document; with `data.reset_position_ids` positions restart at 0 after every EOD. As in Megatron,
the EOD token belongs to the document it ends.

`mask_documents(model, ...)` applies both to every forward call of a model through a forward pre-hook:
the model, its parameter names and its checkpoints stay exactly as they are.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


def document_ids(input_ids: torch.Tensor, eod_id: int) -> torch.Tensor:
    """(batch, seq) index of the document each token belongs to, counted from 0 within each sample."""
    is_eod = (input_ids == eod_id).long()
    return is_eod.cumsum(dim=1) - is_eod  # EODs strictly before the token


def document_position_ids(input_ids: torch.Tensor, eod_id: int) -> torch.Tensor:
    """(batch, seq) positions that restart at 0 on the token after every EOD."""
    seq = input_ids.shape[1]
    index = torch.arange(seq, device=input_ids.device).expand_as(input_ids)
    eod_at = torch.where(input_ids == eod_id, index, torch.full_like(index, -1))
    last_eod = eod_at.cummax(dim=1).values
    before = torch.cat([torch.full_like(last_eod[:, :1], -1), last_eod[:, :-1]], dim=1)  # last EOD before t
    return index - (before + 1)


def document_attention_mask(input_ids: torch.Tensor, eod_id: int) -> torch.Tensor:
    """(batch, 1, seq, seq) bool, True where a query may attend: causal and within its own document."""
    docs = document_ids(input_ids, eod_id)
    seq = input_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=input_ids.device).tril()
    return ((docs[:, :, None] == docs[:, None, :]) & causal).unsqueeze(1)


def mask_documents(model: nn.Module, eod_id: int, reset_attention_mask: bool,
                   reset_position_ids: bool) -> RemovableHandle | None:
    """Make every `model(input_ids, ...)` call respect document boundaries; None when both are off.

    Only fills in what the caller did not pass: an explicit position_ids or attn_mask wins.
    """
    if not (reset_attention_mask or reset_position_ids):
        return None

    def add_boundaries(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        input_ids = args[0] if args else kwargs["input_ids"]
        if reset_position_ids and kwargs.get("position_ids") is None:
            kwargs["position_ids"] = document_position_ids(input_ids, eod_id)
        if reset_attention_mask and kwargs.get("attn_mask") is None:
            kwargs["attn_mask"] = document_attention_mask(input_ids, eod_id)
        return args, kwargs

    return model.register_forward_pre_hook(add_boundaries, with_kwargs=True)

