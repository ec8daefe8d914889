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


def materialize_tensor_shards(model: MegaKVModel, split: TensorSplit, tp_rank: int, seed: int,
                              init_state: Mapping[str, torch.Tensor] | None = None) -> None:
    """Fill a tensor-split skeleton (megakv/parallel/tensor.py applied to `skeleton_model`) in place: each split
    parameter gets tensor rank `tp_rank`'s slice of its dense value, each replicated one the whole value."""
    reference = skeleton_model(model.cfg)  # dense shapes and leaf types, by name
    for name, leaf in parameter_leaves(model):
        dense = reference.get_submodule(name)
        fill_leaf(dense, name, model.cfg, seed, init_state)
        for local, _ in list(leaf.named_parameters(recurse=False)):
            value = shard_tensor(f"{name}.{local}", dense.get_parameter(local).detach(), split, tp_rank)
            _replace_parameter(leaf, local, value)
        dense.to_empty(device="meta", recurse=False)  # frees the dense values
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"parameters left unmaterialised: {leftover[:3]}")


class SafetensorsWeights(Mapping):
    """A model directory's weights as a read-only mapping that reads one tensor per lookup (no dense copy)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = str(path)
        self._file = safe_open(self.path, framework="pt", device="cpu")
        self._names = [n for n in self._file.keys() if not n.startswith("rope.")]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self._file.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
