"""Pipeline parallelism: MegaKVModel as DeepSpeed PipelineModule stages, K/V crossing stage boundaries.

Layer specs, in this order (spec index in brackets, the index DeepSpeed's layer files carry):
  [0]        EmbedPipe             token ids -> hidden (tied with the head when embeddings are tied)
  [1..L]     BlockPipe(i)          model.run_block for layer i = spec index - 1
  [L+1]      NormPipe              final RMSNorm
  [L+2]      HeadPipe | tied head  logits; the loss runs on the last stage
Each rank builds only its stage's layers; `init_weights` gives them the dense model's initial values.

What travels between layers is a tuple of tensors, and the micro-batch's routing plan (int64: one source
per layer, and the layers whose unread K/V are kept for data-parallel peers) is always its second
element, so a 1F1B schedule can never pair activations with another micro-batch's plan. Inside a stage:
(hidden, plan, k_j, v_j, ...) for j in crossing(plan, i). Across the boundary before block c: (packed,
plan), packed = cat(hidden, k_j, v_j for j in crossing(plan, c)) along the feature axis. One float
tensor because DeepSpeed runs one backward per float it sends and asserts that every float it receives
gets a gradient: the hidden part always does, so no keep-alive is needed, and the gradient of each K/V
slice flows back to the source layer's projections on the earlier stage.

Transports (parallel.pipeline_transport):
  fixed    pad to the most K/V slots that can cross c (min(c, L - c, max_distance)); constant shapes, so
           DeepSpeed sends its metadata once and allocates buffers once.
  dynamic  exactly the crossing set; DeepSpeed's dynamic_shape sends metadata with every tensor.

With tensor parallelism inside the stages (parallel.tensor = T, applied by megakv/parallel/tensor.py after
the stage is built), each tensor rank's blocks hold its heads, so the K/V packed across a boundary are
that rank's K/V heads (n_kv_heads / T of them, or the one replicated head when n_kv_heads < T); DeepSpeed's
p2p pairs a rank with the same (data, tensor) coordinate on the next stage, which holds the same heads.
The hidden part is the same on every tensor rank.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from megakv.config.model import ModelConfig
from megakv.model import Block, LiveKV, RMSNorm, RotaryEmbedding, init_weights, run_block
from megakv.parallel.tensor_split import tensor_split
from megakv.routing import RoutingPlan, crossing

BLOCK_TYPE = "BlockPipe"


def plan_tensor(plan: RoutingPlan, keep_kv: frozenset[int] = frozenset()) -> torch.Tensor:
    """(2, n_layers) int64: the sources, then 1 for the layers in run_block's keep_kv."""
    keep = [int(layer in keep_kv) for layer in range(plan.n_layers)]
    return torch.tensor([plan.sources, keep], dtype=torch.long)


def plan_of(tensor: torch.Tensor) -> tuple[RoutingPlan, frozenset[int]]:
    """The plan a plan_tensor carries. Parsed once per tensor: the blocks of a stage pass the same tensor on,
    and reading a GPU tensor's values waits for the GPU (one stall per block per micro-batch otherwise)."""
    parsed = getattr(tensor, "_megakv_plan", None)
    if parsed is None:
        sources, keep = tensor.tolist()
        parsed = RoutingPlan(tuple(int(s) for s in sources)), frozenset(i for i, k in enumerate(keep) if k)
        tensor._megakv_plan = parsed
    return parsed


def max_slots(n_layers: int, boundary: int, max_distance: int | None) -> int:
    """The most K/V that can cross `boundary`: each needs a distinct reader at or after it."""
    most = min(boundary, n_layers - boundary)
    return most if max_distance is None else min(most, max_distance)


def kv_heads_per_rank(cfg: ModelConfig, tensor: int) -> int:
    return tensor_split(cfg, tensor).kv_heads_per_rank


def kv_width(cfg: ModelConfig, tensor: int = 1) -> int:
    """Features of one K (or V) of one layer on one tensor rank."""
    return kv_heads_per_rank(cfg, tensor) * cfg.resolved_head_dim


def pack(hidden: torch.Tensor, live: LiveKV, sources: tuple[int, ...], slots: int, width: int) -> torch.Tensor:
    """(batch, seq, d_model + 2 * slots * width): hidden, then k, v of each source, then zero padding."""
    batch, seq, _ = hidden.shape
    parts = [hidden]
    for j in sources:
        for t in live[j]:  # (batch, kv_heads, seq, head_dim) -> (batch, seq, kv_heads * head_dim)
            parts.append(t.transpose(1, 2).reshape(batch, seq, -1))
    unused = slots - len(sources)
    if unused > 0:
        parts.append(hidden.new_zeros(batch, seq, 2 * unused * width))
    return torch.cat(parts, dim=-1)


def unpack(packed: torch.Tensor, sources: tuple[int, ...], cfg: ModelConfig, tensor: int = 1
           ) -> tuple[torch.Tensor, LiveKV]:
    batch, seq, _ = packed.shape
    d, width, heads = cfg.d_model, kv_width(cfg, tensor), kv_heads_per_rank(cfg, tensor)
    hidden = packed[..., :d]
    live: LiveKV = {}
    for slot, j in enumerate(sources):
        start = d + 2 * slot * width
        k, v = (packed[..., start + i * width:start + (i + 1) * width]
                .reshape(batch, seq, heads, -1).transpose(1, 2) for i in range(2))
        live[j] = (k, v)
    return hidden, live


def boundary_bytes(cfg: ModelConfig, plan: RoutingPlan, boundary: int, tokens: int, element_size: int
                   ) -> dict[str, int]:
    """Forward bytes across `boundary` for one micro-batch of `tokens` tokens (the backward sends as many)."""
    hidden = tokens * cfg.d_model * element_size
    per_source = 2 * tokens * kv_width(cfg) * element_size
    return {"hidden_only": hidden, "megakv": hidden + len(crossing(plan, boundary)) * per_source,
            "all_earlier": hidden + boundary * per_source}


class EmbedPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        init_weights(self.embed, "embed", cfg, seed)

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, plan = inputs
        return self.embed(ids), plan


class BlockPipe(nn.Module):
    """Layer `index`: the dense model's per-layer step, plus (un)packing at stage boundaries.

    `tensor`: the tensor degree the block will be split over (the packed K/V are one rank's heads). With
    `tensor` > 1 the block is built on the meta device, without weights: megakv/parallel/materialize.py fills
    this rank's shard once the block is split, so no rank ever holds the stage's dense blocks.
    """

    def __init__(self, cfg: ModelConfig, index: int, seed: int, stage_starts: tuple[int, ...], transport: str,
                 max_distance: int | None, tensor: int = 1):
        super().__init__()
        self.cfg, self.index, self.transport, self.max_distance = cfg, index, transport, max_distance
        self.tensor = tensor
        if tensor > 1:
            with torch.device("meta"):
                self.block = Block(cfg)
        else:
            self.block = Block(cfg)
            init_weights(self.block, f"layers.{index}", cfg, seed)
        self.rope = RotaryEmbedding(cfg)  # recomputed per stage instead of sent: a non-persistent buffer
        self.receives_packed = index in stage_starts
        self.sends_packed = index + 1 in stage_starts

    def _slots(self, boundary: int, sources: tuple[int, ...]) -> int:
        if self.transport == "dynamic":
            return len(sources)
        return max_slots(self.cfg.n_layers, boundary, self.max_distance)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        plan_t = inputs[1]
        plan, keep = plan_of(plan_t)
        sources = crossing(plan, self.index)
        if self.receives_packed:
            hidden, live = unpack(inputs[0], sources, self.cfg, self.tensor)
        else:
            hidden, flat = inputs[0], inputs[2:]
            live = {j: (flat[2 * n], flat[2 * n + 1]) for n, j in enumerate(sources)}
        seq = hidden.shape[1]
        positions = torch.arange(seq, device=hidden.device).unsqueeze(0).expand(hidden.shape[0], seq)
        rope = self.rope(positions, hidden.dtype)
        hidden = run_block(self.block, self.index, hidden, rope, plan, live, keep_kv=keep)
        after = crossing(plan, self.index + 1)
        if self.sends_packed:
            slots = self._slots(self.index + 1, after)
            return pack(hidden, live, after, slots, kv_width(self.cfg, self.tensor)), plan_t
        return (hidden, plan_t, *(t for j in after for t in live[j]))


class NormPipe(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return self.norm(inputs[0])  # after the last block nothing else is live


class HeadPipe(nn.Module):
    def __init__(self, cfg: ModelConfig, seed: int):
        super().__init__()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self.lm_head, "lm_head", cfg, seed)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)


def tied_head(embed: EmbedPipe, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, embed.embed.weight)


def layer_specs(cfg: ModelConfig, seed: int, cuts: list[int], transport: str, max_distance: int | None,
                tensor: int = 1) -> list:
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    stage_starts = tuple(cuts[1:-1])
    if cfg.tie_embeddings:
        first = TiedLayerSpec("embed", EmbedPipe, cfg, seed, tied_weight_attr=["embed.weight"])
        last = TiedLayerSpec("embed", EmbedPipe, cfg, seed, forward_fn=tied_head, tied_weight_attr=["embed.weight"])
    else:
        first, last = LayerSpec(EmbedPipe, cfg, seed), LayerSpec(HeadPipe, cfg, seed)
    blocks = [LayerSpec(BlockPipe, cfg, i, seed, stage_starts, transport, max_distance, tensor)
              for i in range(cfg.n_layers)]
    return [first, *blocks, LayerSpec(NormPipe, cfg), last]


def spec_parts(cuts: list[int]) -> list[int]:
    """Block cuts -> spec-index cuts: the embedding joins the first stage, norm and head the last."""
    return [0, *(c + 1 for c in cuts[1:-1]), cuts[-1] + 3]


def pipeline_module(cfg: ModelConfig, seed: int, cuts: list[int], topology, loss_fn, transport: str,
                    max_distance: int | None, tensor: int = 1):
    """A PipelineModule that runs megakv's own stage cut (checked before launch), not DeepSpeed's.

    With `tensor` > 1 its blocks are weightless (meta) skeletons: `stage_blocks` gives them to the tensor
    split, then materialize_block_shards fills this rank's shard.
    """
    from deepspeed.pipe import PipelineModule

    class MegaKVPipeline(PipelineModule):
        def _partition_layers(self, method: str = "uniform") -> None:
            # DeepSpeed's own methods would build every layer on every rank just to count parameters.
            stage = self._topo.get_coord(self.global_rank).pipe
            self.parts = spec_parts(cuts)
            self._set_bounds(start=self.parts[stage], stop=self.parts[stage + 1])

        def _apply(self, fn, recurse: bool = True):
            # DeepSpeed moves the freshly built stage to its device; meta skeletons (tensor-split blocks,
            # filled after the split) have nothing to move yet and stay meta.
            return super()._apply(lambda t: t if t.is_meta else fn(t), recurse)

    # With train.activation_checkpointing DeepSpeed recomputes one block at a time (interval 1, set from
    # the DeepSpeed config); only blocks, so the embedding's chunk is never recomputed.
    return MegaKVPipeline(layer_specs(cfg, seed, cuts, transport, max_distance, tensor), topology=topology,
                          loss_fn=loss_fn, partition_method="megakv", dynamic_shape=transport == "dynamic",
                          checkpointable_layers=[BLOCK_TYPE])


def stage_blocks(module: nn.Module) -> dict[int, Block]:
    """The transformer blocks this stage runs, by layer index, in layer order."""
    return {layer.index: layer.block for layer in module.modules() if isinstance(layer, BlockPipe)}


# ----------------------------------------------------------------------------- names: pipeline <-> dense

_SPEC_KEY = re.compile(r"^(\d+)\.(.+)$")


def dense_name(key: str, n_layers: int) -> str:
    """A PipelineModule state_dict key ('3.block.attn.q_proj.weight', 'tied_modules.embed.embed.weight')
    or a layer-file key prefixed with its spec index, as the MegaKVModel key ('layers.2.attn.q_proj.weight')."""
    if key.startswith("tied_modules.embed."):
        return key.removeprefix("tied_modules.embed.")
    match = _SPEC_KEY.match(key)
    if match is None:
        raise KeyError(f"not a pipeline parameter name: {key!r}")
    index, rest = int(match.group(1)), match.group(2)
    if index == 0 or index == n_layers + 2:  # embed.weight / lm_head.weight
        return rest
    if index == n_layers + 1:
        return rest  # norm.weight
    return f"layers.{index - 1}.{rest.removeprefix('block.')}"


def dense_named_parameters(module: nn.Module, n_layers: int) -> Iterator[tuple[str, nn.Parameter]]:
    for key, param in module.named_parameters():
        yield dense_name(key, n_layers), param


class DenseNames:
    """A view of a stage's parameters under MegaKVModel names (for name-based rules like weight decay)."""

    def __init__(self, module: nn.Module, n_layers: int):
        self.module, self.n_layers = module, n_layers

    def named_parameters(self):
        return dense_named_parameters(self.module, self.n_layers)


def load_dense_weights(module: nn.Module, state: Mapping[str, torch.Tensor], n_layers: int) -> None:
    """Copy a MegaKVModel state dict into this stage's materialised layers (meta blocks are left to
    materialize_block_shards, which reads their entries itself)."""
    with torch.no_grad():
        for key, tensor in module.state_dict().items():
            if not tensor.is_meta:
                tensor.copy_(state[dense_name(key, n_layers)])
