"""What the inference-side CLIs (megakv-generate, megakv-eval, megakv-plan) share: model options and errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="megakv model directory, training run directory (latest checkpoint), or a transformers "
                             "checkpoint directory (Llama/Mistral/Qwen2/Qwen3, or one exported by megakv-convert "
                             "to-hf-rcla)")
    parser.add_argument("--device", default="cpu",
                        help="torch device: cpu, cuda, cuda:1, ... or auto (cuda when available, else cpu; "
                             "default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weights and activations dtype (default: float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def apply_runtime_options(args: argparse.Namespace) -> None:
    """Check --threads and --device before anything is loaded; `--device auto` becomes the device it picks."""
    from megakv.config.devices import device_problem, resolve_device

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads = {args.threads}: must be a positive number of CPU threads. Fix: pass e.g. "
                         "--threads 4, or leave it out for torch's choice")
    problem = device_problem(args.device)
    if problem is not None:
        raise ValueError(f"--device = {args.device!r}: {problem}. Fix: pass --device cpu (or auto), or run on a "
                         "machine with that device")
    args.device = resolve_device(args.device)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads is not None:
        torch.set_num_threads(args.threads)


def plot_suffixes() -> tuple[str, ...]:
    """The file types matplotlib writes (png, pdf, svg, jpg, ...)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return tuple(f".{kind}" for kind in sorted(FigureCanvasAgg(Figure()).get_supported_filetypes()))


def check_output_file(path: str | None, flag: str, suffixes: tuple[str, ...] = ()) -> None:
    """Before any work: a results file can be written where it is asked for (else the error came after the whole
    evaluation, or a plot landed under another name)."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a directory: give a file path")
    existing = next(parent for parent in target.parents if parent.exists())
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, so nothing can be written under it")
    if suffixes and target.suffix.lower() not in suffixes:
        raise ValueError(f"{flag} {path}: give a file name ending in {', '.join(suffixes)}")


def given_options(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The option dests the command line sets itself (a default equal to the given value still counts)."""
    unset = object()  # argparse fills in defaults only for attributes the namespace lacks
    prefilled = argparse.Namespace(**dict.fromkeys(vars(parser.parse_args(argv)), unset))
    return {dest for dest, value in vars(parser.parse_args(argv, prefilled)).items() if value is not unset}


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run `body`; user mistakes (bad paths, specs, data) become one clear line and exit status 2."""
    from megakv.data.errors import DataError

    try:
        return body()
    except (OSError, ValueError, KeyError, DataError) as e:  # OSError: a file where a directory goes, and so on
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError | torch.OutOfMemoryError) and "allocate" not in str(e):
            raise  # a bug, not a setting: keep its traceback
        print(f"{prog}: error: out of memory ({str(e).splitlines()[0][:200]}). Fix: lower --max-new-tokens, "
              "--batch-size or --seq-len, or the number of prompts", file=sys.stderr)
        return 2
