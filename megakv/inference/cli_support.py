"""What the inference-side CLIs (megakv-generate, megakv-eval, megakv-plan) share: model options and errors."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="megakv model directory, training run directory (latest checkpoint), or a transformers "
                             "checkpoint directory (Llama/Mistral/Qwen2/Qwen3, or one exported by megakv-convert "
                             "to-hf-rcla)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                        help="weights and activations dtype (default: float32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def apply_runtime_options(args: argparse.Namespace) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.threads:
        torch.set_num_threads(args.threads)


def run_cli(prog: str, body: Callable[[], int]) -> int:
    """Run `body`; user mistakes (bad paths, specs, data) become one clear line and exit status 2."""
    from megakv.data.errors import DataError

    try:
        return body()
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, DataError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2
