"""megakv-convert: move weights between megakv model directories and transformers checkpoints.

  megakv-convert from-hf HF_DIR OUT_DIR        transformers Llama/Mistral/Qwen2/Qwen3 -> megakv model dir
  megakv-convert to-hf MEGAKV_DIR OUT_DIR      megakv model dir -> transformers directory (save_pretrained layout)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _from_hf(args: argparse.Namespace) -> Path:
    import tempfile

    from megakv.hf.checkpoint import copy_tokenizer_files, load_hf_checkpoint
    from megakv.model_dir import save_model_dir

    cfg, state = load_hf_checkpoint(args.src)
    with tempfile.TemporaryDirectory() as tok:
        has_tokenizer = bool(copy_tokenizer_files(args.src, tok))
        return save_model_dir(cfg, state, args.out, tokenizer_dir=tok if has_tokenizer else None,
                              overwrite=args.overwrite)


def _to_hf(args: argparse.Namespace) -> Path:
    from safetensors.torch import load_file

    from megakv.hf.checkpoint import save_hf_checkpoint
    from megakv.model_dir import WEIGHTS_FILE, load_model_config, tokenizer_path

    cfg = load_model_config(args.src)
    state = load_file(str(Path(args.src) / WEIGHTS_FILE))
    return save_hf_checkpoint(cfg, state, args.out, tokenizer_dir=tokenizer_path(args.src),
                              overwrite=args.overwrite, dtype=DTYPES[args.dtype] if args.dtype else None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megakv-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("from-hf", _from_hf, "transformers checkpoint directory -> megakv model directory"),
        ("to-hf", _to_hf, "megakv model directory -> transformers checkpoint directory"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("src")
        p.add_argument("out")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
        if name == "to-hf":
            p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"megakv-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
