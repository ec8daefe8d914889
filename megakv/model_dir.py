"""A megakv model directory: `config.yaml` (ModelConfig), `model.safetensors` and, when known, `tokenizer/`
(a copy of the tokenizer the model was trained with) and `generation_config.json` (an imported model's, for its
exports). Written atomically: a crash leaves no half-written directory that looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from megakv.config import ModelConfig, load_section, save_config
from megakv.directories import replace_directory
from megakv.model import MegaKVModel, rope_inverse_frequencies

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
# An imported model's generation_config.json (sampling defaults), kept for its exports: megakv itself reads none.
GENERATION_FILE = "generation_config.json"


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give `root` and everything under it the modes a plain `mkdir`/`open` would have had.

    mkdtemp (and the temp files some writers rename into place) create 0700 / 0600 entries; colleagues on a
    shared filesystem could not read an export. Respect the umask, as cp/tar/save_pretrained do.
    """
    mask = current_umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_directory_atomically(out_dir: str | Path, fill: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Create `out_dir` by filling a temporary sibling and renaming it into place."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists and is not empty: choose a new output directory "
                              f"or pass --overwrite")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    try:
        fill(tmp)
        apply_umask(tmp)
        replace_directory(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def save_model_dir(model_cfg: ModelConfig, state_dict: dict[str, torch.Tensor], out_dir: str | Path,
                   tokenizer_dir: str | Path | None = None, overwrite: bool = False,
                   generation: dict | None = None) -> Path:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items() if not k.startswith("rope.")}
    if model_cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)

    def fill(tmp: Path) -> None:
        save_config(model_cfg, tmp / CONFIG_FILE)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "producer": "megakv"})
        if generation:
            (tmp / GENERATION_FILE).write_text(json.dumps(generation, indent=2, sort_keys=True) + "\n")
        if tokenizer_dir is not None:
            from megakv.data.tokenizer import copy_tokenizer_dir

            copy_tokenizer_dir(Path(tokenizer_dir), tmp / TOKENIZER_DIR)  # never through a link out of it

    return write_directory_atomically(out_dir, fill, overwrite)


def is_model_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def load_model_config(model_dir: str | Path) -> ModelConfig:
    model_dir = Path(model_dir)
    if not is_model_dir(model_dir):
        raise FileNotFoundError(
            f"{model_dir} is not a megakv model directory (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
            f"convert a transformers checkpoint with `megakv-convert from-hf` or a training run with "
            f"`megakv-convert from-checkpoint`")
    return load_section(model_dir / CONFIG_FILE, ModelConfig, "model")


def check_fits_dtype(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
    """Refuse a cast that would turn weights into inf (float16 tops out at 65504): no silent broken model."""
    if dtype is None or not dtype.is_floating_point:
        return
    largest = torch.finfo(dtype).max
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.numel() and torch.finfo(tensor.dtype).max > largest:
            peak = float(tensor.detach().abs().max())
            if peak > largest:
                raise ValueError(f"{name} holds {peak:.4g}, beyond {str(dtype).removeprefix('torch.')}'s largest "
                                 f"value {largest:.6g}: it would become inf. Fix: use bfloat16 or float32")


def stored_dtype(model_dir: str | Path) -> torch.dtype | None:
    """The floating dtype of a model directory's weights as stored (None when they mix dtypes)."""
    from safetensors import safe_open

    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
    with safe_open(str(Path(model_dir) / WEIGHTS_FILE), "pt") as f:
        found = {f.get_slice(key).get_dtype() for key in f.keys()}
    floating = {names[d] for d in found if d in names}
    return floating.pop() if len(floating) == 1 else None


_LAYER_NAME = re.compile(r"layers\.(\d+)\.")
_FIX_CONFIG = "Fix: use the config.yaml the weights were saved with"


def check_weights_fit(cfg: ModelConfig, shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Refuse a config that does not describe the weights (names -> shapes), before any real memory is taken: a
    config.yaml saying n_layers: 100000000 had megakv-generate build modules for minutes and GBs first."""
    layers = {int(m.group(1)) for name in shapes if (m := _LAYER_NAME.match(name))}
    if len(layers) != cfg.n_layers or max(layers, default=-1) != cfg.n_layers - 1:  # not range(n_layers)
        raise ValueError(f"{source}: the model config says n_layers={cfg.n_layers}, but the weights hold "
                         f"{len(layers)} layers. {_FIX_CONFIG}")
    with torch.device("meta"):  # shapes only: no memory, and as many modules as the weights have layers
        expected = {name: tuple(t.shape) for name, t in MegaKVModel(cfg).state_dict().items()}
    given = {name: tuple(shape) for name, shape in shapes.items() if not name.startswith("rope.")}
    wrong = sorted(name for name in expected.keys() & given.keys() if expected[name] != given[name])
    missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
    if wrong or missing or unexpected:
        detail = (f"size mismatch: {wrong[0]} is {given[wrong[0]]}, the config implies {expected[wrong[0]]}" if wrong
                  else f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        raise ValueError(f"{source}: weights do not match the model config ({detail}). {_FIX_CONFIG}")


_REEXPORT = "copy the model directory again, or re-export it with megakv-convert"


def safetensors_shapes(path: str | Path, fix: str = _REEXPORT) -> dict[str, tuple[int, ...]]:
    """Names and shapes in a safetensors file's header, without reading the tensors."""
    from safetensors import safe_open

    if not Path(path).exists():
        raise FileNotFoundError(f"{path} does not exist. Fix: {fix}")
    try:
        with safe_open(str(path), "pt") as f:
            return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"{path}: truncated or corrupt safetensors file ({e}). Fix: {fix}") from None
    except OSError as e:  # permissions, I/O errors: not a damaged file
        raise ValueError(f"{path} cannot be read ({e.strerror or e}). Fix: check its permissions and the file "
                         "system it is on") from None


def model_from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], device: str | torch.device = "cpu",
                          dtype: torch.dtype | None = None, source: str = "checkpoint") -> MegaKVModel:
    """Build a MegaKVModel holding exactly `state`, without first initialising weights that get overwritten."""
    check_weights_fit(cfg, {name: tuple(t.shape) for name, t in state.items()}, source)
    with torch.device("meta"):
        model = MegaKVModel(cfg)
    model.to_empty(device=device)
    with torch.no_grad():
        model.rope.inv_freq.copy_(rope_inverse_frequencies(cfg))  # a buffer, never in the weights
    state = {k: v for k, v in state.items() if not k.startswith("rope.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a tensor of another shape than the config implies
        raise ValueError(f"{source}: weights do not match the model config ({str(e).splitlines()[-1].strip()}). "
                         "Fix: use the config.yaml the weights were saved with") from None
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the model config (missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    if dtype is not None:
        check_fits_dtype(state, dtype)
        model.to(dtype)
    return model.eval()


def read_safetensors(path: str | Path, device: str | torch.device = "cpu",
                     fix: str = _REEXPORT,
                     ) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a damaged or unreadable file is a ValueError naming it and `fix`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist. Fix: {fix}")
    try:
        return load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{path}: truncated or corrupt safetensors file ({e}). Fix: {fix}") from None
    except OSError as e:  # permissions, I/O errors: not a damaged file
        raise ValueError(f"{path} cannot be read ({e.strerror or e}). Fix: check its permissions and the file "
                         "system it is on") from None


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None) -> MegaKVModel:
    cfg = load_model_config(model_dir)
    path = Path(model_dir) / WEIGHTS_FILE
    if path.is_file():  # before reading GBs of weights a wrong config could not use
        check_weights_fit(cfg, safetensors_shapes(path), str(path))
    state = read_safetensors(path, device)
    return model_from_state_dict(cfg, state, device, dtype, source=f"{model_dir}/{WEIGHTS_FILE}")


def tokenizer_path(model_dir: str | Path) -> Path | None:
    path = Path(model_dir) / TOKENIZER_DIR
    return path if path.is_dir() else None
