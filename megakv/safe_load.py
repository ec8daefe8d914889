"""Open checkpoint files someone may have sent you without running code from them.

A pickle can name any Python callable, and `torch.load(weights_only=False)` calls it. Every file of a checkpoint
but megakv's own JSON is first parsed by torch's weights-only unpickler, which only builds tensors, containers and
the globals on an explicit allow-list; a file that needs anything else is refused, naming the file and the
global. Only then may a trusted loader (DeepSpeed's, which uses weights_only=False) read it. Parameter names
are checked too (conversions make paths of them), and DeepSpeed's universal converter runs with every load
forced weights-only besides (megakv/train/safe_ds_to_universal.py).

The allow-list holds exactly what DeepSpeed 0.19 stores in ZeRO-1/2/3, bf16, offload and universal
checkpoints (found by saving real ones and listing their globals), plus numpy's array pickling for the
RNG files megakv wrote before it switched them to JSON.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import threading
from pathlib import Path

import torch

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_GLOBAL_IN_ERROR = re.compile(r"(?:GLOBAL|global)\s+([\w.]+)")
# torch's allow-list (torch.serialization.safe_globals) is one set per process: a thread leaving the context
# removes the globals another thread's load still needs. Loads through this module take turns.
_ALLOW_LIST_LOCK = threading.RLock()  # re-entered: forced_weights_only around loaders that use load_weights_only


class UnsafeFileError(ValueError):
    """A file that the weights-only unpickler refused: it needs a global outside the allow-list (or is
    not a torch file at all)."""

    def __init__(self, path: Path, problem: str, global_name: str | None = None):
        self.path, self.global_name = Path(path), global_name
        super().__init__(f"refusing to open {path}: {problem}. It was not loaded and no code from it ran. "
                         "Fix: only resume or export checkpoints written by megakv-train; if this one is yours, "
                         "it is damaged: use an older checkpoint or re-create it")


def deepspeed_globals() -> list:
    """The non-tensor types DeepSpeed pickles into its checkpoint files."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def numpy_globals() -> list:
    """numpy arrays as pickled by `torch.save` (the legacy rng/rank*.pt files: numpy's MT19937 state)."""
    import numpy as np

    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return [_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def load_weights_only(path: str | Path, allowed: list | tuple = (), mmap: bool = False):
    """torch.load through the weights-only unpickler with `allowed` globals added; refusals raise
    UnsafeFileError naming the file and the global."""
    path = Path(path)
    try:
        with _ALLOW_LIST_LOCK, torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        raise _refusal(path, e) from None


def _refusal(path: Path, error: pickle.UnpicklingError) -> UnsafeFileError:
    """The weights-only unpickler's refusal as an UnsafeFileError naming the file and, where it says, the global."""
    text = str(error)
    found = _GLOBAL_IN_ERROR.search(text)
    if found:
        return UnsafeFileError(path, f"it needs the global {found.group(1)!r}, which is not on the allow-list",
                               found.group(1))
    first_line = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return UnsafeFileError(path, f"the weights-only unpickler refused it ({first_line[:300]})")


@contextlib.contextmanager
def forced_weights_only(source: str | Path):
    """Every torch.load inside, a trusted loader's `weights_only=False` included, goes through the weights-only
    unpickler with DeepSpeed's and numpy's globals allowed (torch reads TORCH_FORCE_WEIGHTS_ONLY_LOAD at each
    load): a second guard around DeepSpeed's loaders, after `check_deepspeed_dir`, for any file it missed. A
    refusal is an UnsafeFileError naming `source` (the loader does not say which file it was reading)."""
    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    with _ALLOW_LIST_LOCK, torch.serialization.safe_globals(deepspeed_globals() + numpy_globals()):
        os.environ[FORCE_WEIGHTS_ONLY] = "1"
        try:
            yield
        except pickle.UnpicklingError as e:
            raise _refusal(Path(source), e) from None
        finally:
            if before is None:
                os.environ.pop(FORCE_WEIGHTS_ONLY, None)
            else:
                os.environ[FORCE_WEIGHTS_ONLY] = before


def check_torch_file(path: str | Path, allowed: list | tuple):
    """Parse a whole `.pt` file safely (tensor data memory-mapped, not read) and return what it holds."""
    path = Path(path)
    try:
        return load_weights_only(path, allowed, mmap=True)
    except RuntimeError as e:
        if "mmap" not in str(e):  # a truncated or foreign file: name it
            raise UnsafeFileError(path, f"it is not a readable torch file ({str(e).splitlines()[0][:300]})") from None
        return load_weights_only(path, allowed)  # the legacy (non-zip) format cannot be memory-mapped


# A parameter name is a dotted path of identifiers. DeepSpeed's universal conversion (and megakv's tensor-parallel
# one) turn names into folder names, so a name holding '/' or '..' would read and write outside the checkpoint.
_PARAMETER_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")
_NAME_FIELDS = frozenset({"param_shapes", "frozen_param_shapes", "param_slice_mappings", "frozen_param_fragments",
                          "shared_params", "buffer_names", "module"})


def _parameter_names(held, depth: int = 0):
    """The parameter names a DeepSpeed checkpoint file holds (model, optimizer and pipeline-layer files)."""
    if isinstance(held, dict) and depth < 3:
        for key, value in held.items():
            if key in _NAME_FIELDS:
                for group in (value if isinstance(value, list) else [value]):
                    if group is None:  # a pipeline's model file keeps its modules in the layer files
                        continue
                    if isinstance(group, dict):
                        yield from group.keys()
                        if key == "shared_params":
                            yield from group.values()
                    else:
                        yield group
            else:
                yield from _parameter_names(value, depth + 1)
        if depth == 0 and all(isinstance(v, torch.Tensor) for v in held.values()):  # a pipeline layer's state
            yield from held.keys()


_MEGAKV_JSON = re.compile(r"megakv_state\.json|megakv_split_dims\.json|rank\d{5}\.json")


def _megakv_json(path: Path) -> bool:
    """megakv's own JSON files, which only json.loads reads. Any other name is parsed like a torch file, a
    `.json` suffix too: DeepSpeed's converter opens every `mp_rank_*` file whatever its suffix."""
    return _MEGAKV_JSON.fullmatch(path.name) is not None


def first_link(directory: str | Path) -> Path | None:
    """The first link found inside `directory` (not following any), or None."""
    for root, dirs, names in os.walk(directory, followlinks=False):
        for name in sorted(dirs + names):
            if os.path.islink(os.path.join(root, name)):
                return Path(root) / name
    return None


def check_deepspeed_dir(directory: str | Path) -> int:
    """Check every file under a DeepSpeed checkpoint directory but megakv's own JSON with the weights-only
    unpickler, and every parameter name in them; returns how many torch files were checked.

    Every file, not only `*.pt`: DeepSpeed's universal conversion also opens files by prefix (`mp_rank_*`) or by
    a path built from a parameter name. A link inside it is refused: megakv never writes one, the walk here
    does not follow it, and DeepSpeed's loaders would (a linked folder could hand them files never checked).
    """
    allowed = deepspeed_globals() + numpy_globals()
    link = first_link(directory)
    if link is not None:
        raise UnsafeFileError(link, "a checkpoint holds no links (megakv never writes one), and a link can lead a "
                              "loader to files this check did not see")
    files = [Path(root) / name for root, _, names in os.walk(directory) for name in names
             if not _megakv_json(Path(root) / name)]
    for path in sorted(files):
        for name in _parameter_names(check_torch_file(path, allowed)):
            if not isinstance(name, str) or not _PARAMETER_NAME.fullmatch(name):
                raise UnsafeFileError(path, f"it names a parameter {name!r}, which is not a dotted parameter name "
                                      "(conversions turn names into paths)")
    return len(files)


__all__ = ["UnsafeFileError", "check_deepspeed_dir", "check_torch_file", "deepspeed_globals", "first_link",
           "forced_weights_only", "load_weights_only", "numpy_globals"]
