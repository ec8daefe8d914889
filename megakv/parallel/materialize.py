"""Build a model that never exists whole on one rank: a meta-device skeleton, then one leaf module at a time.

The dense build (`MegaKVModel(cfg, init_seed=seed)`) allocates every weight on every rank before DeepSpeed
partitions it (ZeRO-3) or tensor parallelism slices it, so a model larger than one rank's memory cannot start.
Here the model is first built on the meta device (shapes, no storage, no initialisation), then each leaf
module that owns parameters (a Linear, the embedding, a norm) is materialised on its own, initialised exactly
as the dense build initialises it (`init_weights` is a function of (seed, name) alone), and handed over at once:

- ZeRO-3 (`build_zero3_model`): DeepSpeed converts the leaf's parameters into ZeRO parameters, which keeps
  this rank's partition and frees the full tensor (what `deepspeed.zero.Init` does for a model built inside
  it, without its tensor-constructor patches, which would compute the RoPE buffer in the training dtype).
- Tensor parallelism (`materialize_tensor_shards`): the skeleton is split first (megakv/parallel/tensor.py
  works on meta tensors), then each split parameter receives this rank's slice of the dense value.

Either way a rank holds its own part plus, transiently, one dense leaf (at most a Linear's weight and bias,
or the embedding). Initial weights are bit-equal to the dense build's for the same seed, or to `init_state`
(dense names; a lazy mapping such as `SafetensorsWeights` reads one tensor at a time).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from torch import nn

from megakv.config.model import ModelConfig
from megakv.model import MegaKVModel, RMSNorm, init_weights, rope_inverse_frequencies
from megakv.parallel.tensor_split import TensorSplit, shard_tensor

# The leaf types `init_weights` knows how to initialise; any other module owning parameters is an error here,
# rather than a weight silently left as uninitialised memory.
_INITIALISED_LEAVES = (nn.Linear, nn.Embedding, RMSNorm)


def skeleton_model(cfg: ModelConfig) -> MegaKVModel:
    """The model's module tree on the meta device (no weight allocated), with its real RoPE buffer."""
    with torch.device("meta"):
        model = MegaKVModel(cfg)
    model.rope.inv_freq = rope_inverse_frequencies(cfg)  # a buffer computed from the config, never trained
    return model


def parameter_leaves(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module that owns parameters directly, in registration order."""
    for name, module in model.named_modules():
        if next(module.parameters(recurse=False), None) is not None:
            yield name, module


def fill_leaf(leaf: nn.Module, name: str, cfg: ModelConfig, seed: int,
              init_state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Materialise the meta `leaf` (named `name` in the model) on the CPU, in place, holding the values the
    dense build gives it for `seed`, or its entries of `init_state`."""
    names = {local: f"{name}.{local}" for local, _ in leaf.named_parameters(recurse=False)}
    if init_state is None and not isinstance(leaf, _INITIALISED_LEAVES):
        raise TypeError(f"{name} ({type(leaf).__name__}) owns parameters but init_weights does not initialise "
                        f"this module type; teach megakv/model.py init_weights about it")
    if init_state is not None:
        missing = [n for n in names.values() if n not in init_state]
        if missing:
            raise KeyError(f"the initial weights have no {missing[0]!r} (expected MegaKVModel names)")
    leaf.to_empty(device="cpu", recurse=False)
    if init_state is None:
        init_weights(leaf, name, cfg, seed)
        return
    with torch.no_grad():
        for local, param in leaf.named_parameters(recurse=False):
            param.copy_(init_state[names[local]])


def _training_dtype(ds_config: dict) -> torch.dtype:
    if ds_config.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_config.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def build_zero3_model(cfg: ModelConfig, seed: int, ds_config: dict,
                      init_state: Mapping[str, torch.Tensor] | None = None) -> MegaKVModel:
    """A MegaKVModel whose parameters are ZeRO-3 partitions over the world, built one leaf at a time.

    Collective (DeepSpeed broadcasts each parameter from rank 0 as it partitions it): every rank calls it with
    the same arguments. Parameters are cast to the training dtype first, as the engine casts a dense model.
    """
    from deepspeed import zero

    model = skeleton_model(cfg)
    dtype = _training_dtype(ds_config)
    offload = ds_config.get("zero_optimization", {}).get("offload_param", {}).get("device")
    first_zero_param = None
    for name, leaf in parameter_leaves(model):
        fill_leaf(leaf, name, cfg, seed, init_state)
        leaf.to(dtype)
        params = list(leaf.parameters(recurse=False))
        if first_zero_param is None:  # one Init for the model; later leaves join its partitioning
            zero.Init(module=leaf, config_dict_or_path=ds_config, dtype=dtype, remote_device=offload)
            first_zero_param = params[0]
        else:
            first_zero_param.convert_to_zero_parameters(param_list=params)
    return model


def _replace_parameter(leaf: nn.Module, local: str, value: torch.Tensor) -> None:
    """Put `value` in place of the (meta) parameter `local` of `leaf`, keeping its attributes (the split
    markers DeepSpeed's grad norm reads) and its gradient hooks (the tensor-group reductions)."""
    old = leaf.get_parameter(local)
    new = nn.Parameter(value, requires_grad=old.requires_grad)
    for attr, attr_value in vars(old).items():
        setattr(new, attr, attr_value)
    for hook in (old._backward_hooks or {}).values():
        new.register_hook(hook)
    leaf.register_parameter(local, new)


def _fill_shards(root: nn.Module, prefix: str, cfg: ModelConfig, split: TensorSplit, tp_rank: int, seed: int,
                 init_state: Mapping[str, torch.Tensor] | None) -> None:
    """Fill the split meta `root` (the MegaKVModel's submodule `prefix`, "" for the model) leaf by leaf."""
    reference = skeleton_model(cfg)  # dense shapes and leaf types, by name
    for local_name, leaf in parameter_leaves(root):
        name = prefix + local_name
        dense = reference.get_submodule(name)
        fill_leaf(dense, name, cfg, seed, init_state)
        for local, _ in list(leaf.named_parameters(recurse=False)):
            value = shard_tensor(f"{name}.{local}", dense.get_parameter(local).detach(), split, tp_rank)
            _replace_parameter(leaf, local, value)
        dense.to_empty(device="meta", recurse=False)  # frees the dense values
    leftover = [prefix + n for n, p in root.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"parameters left unmaterialised: {leftover[:3]}")


def materialize_tensor_shards(model: MegaKVModel, split: TensorSplit, tp_rank: int, seed: int,
                              init_state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Fill a tensor-split skeleton (megakv/parallel/tensor.py applied to `skeleton_model`) in place: each split
    parameter gets tensor rank `tp_rank`'s slice of its dense value, each replicated one the whole value."""
    _fill_shards(model, "", model.cfg, split, tp_rank, seed, init_state)


def materialize_block_shards(blocks: Mapping[int, nn.Module], cfg: ModelConfig, split: TensorSplit, tp_rank: int,
                             seed: int, init_state: Mapping[str, torch.Tensor] | None = None) -> None:
    """The same for a pipeline stage's split meta blocks, by layer index (dense names `layers.<i>.*`)."""
    for index, block in blocks.items():
        _fill_shards(block, f"layers.{index}.", cfg, split, tp_rank, seed, init_state)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


class SafetensorsWeights(Mapping):
    """A model directory's weights file as a read-only mapping that reads one tensor per lookup (no dense copy).

    Each lookup reads that tensor's bytes from the file into fresh memory (plain reads, not a memory map, so a
    rank's resident memory is what it holds, not the pages of the whole file it has touched). Opening it checks
    every name and shape in the file's header against `cfg`, so weights that do not fit the model fail here,
    before any weight is read.
    """

    def __init__(self, path: str | Path, cfg: ModelConfig):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                header_len = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(header_len)) if 0 < header_len < 100 * 2**20 else None
            size = self.path.stat().st_size
            entries = {n: e for n, e in header.items() if n != "__metadata__" and not n.startswith("rope.")}
            self._data_start = 8 + header_len
            shapes = {n: tuple(e["shape"]) for n, e in entries.items()}
            for entry in entries.values():
                begin, end = entry["data_offsets"]
                if entry["dtype"] not in _SAFETENSORS_DTYPES or not 0 <= begin <= end <= size - self._data_start:
                    raise ValueError(f"entry {entry} is outside the file or of an unknown dtype")
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            raise ValueError(f"{self.path}: truncated or corrupt safetensors file ({e}). Fix: copy the model "
                             "directory again, or re-export it with megakv-convert") from None
        expected = {n: tuple(t.shape) for n, t in skeleton_model(cfg).state_dict().items()}
        wrong = sorted(n for n in expected.keys() & shapes.keys() if expected[n] != shapes[n])
        missing, unexpected = sorted(expected.keys() - shapes.keys()), sorted(shapes.keys() - expected.keys())
        if wrong or missing or unexpected:
            detail = (f"{wrong[0]} is {shapes[wrong[0]]}, the config implies {expected[wrong[0]]}" if wrong else
                      f"missing {missing[:5]}, unexpected {unexpected[:5]}")
            raise ValueError(f"{self.path}: weights do not match the model config ({detail}). "
                             "Fix: use the config.yaml the weights were saved with")
        self._entries = {n: entries[n] for n in expected}

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        begin, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=_SAFETENSORS_DTYPES[entry["dtype"]])
        if out.numel() * out.element_size() != end - begin:
            raise ValueError(f"{self.path}: {name} holds {end - begin} bytes, its shape and dtype need "
                             f"{out.numel() * out.element_size()}. Fix: re-export the model directory")
        with open(self.path, "rb") as f:
            f.seek(self._data_start + begin)
            if f.readinto(out.view(-1).view(torch.uint8).numpy()) != end - begin:
                raise ValueError(f"{self.path}: truncated while reading {name}. Fix: copy the model directory again")
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
