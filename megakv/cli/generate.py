"""megakv-generate: generate text with a KV cache kept only for the retained layers.

  megakv-generate --model DIR --prompt "Once upon a time" --retain every:2 --max-new-tokens 64 --stats
  megakv-generate --model DIR --prompt "a" --prompt "b c" --retain 0,3,5 --temperature 0.8 --top-p 0.9 --seed 1
  megakv-generate --model DIR --prompt-ids "5 17 42"      # a model without a tokenizer: ids in, ids out
  megakv-generate --model DIR --prompt "a" --retain every:1 --shrink-at 256:every:2,512:every:4 --stats

--shrink-at N:S' (elastic retention): the first N new tokens are generated with the current retained set,
then the generation moves to S', which must be a subset of it; the dropped layers' cache is freed at
once and nothing is recomputed (the prefix keeps the K/V it was given; see megakv/inference/engine.py).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from megakv.inference.cli_support import DTYPES, add_model_arguments, apply_runtime_options, run_cli
from megakv.inference.sampling import SamplingConfig

MAX_NEW_TOKENS = 64


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megakv-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser)
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="a text prompt (repeat for a batch)")
    prompts.add_argument("--prompt-ids", action="append",
                         help="a prompt as token ids, e.g. '5 17 42' (repeat for a batch)")
    parser.add_argument("--retain", default=None,
                        help="layers that keep a KV cache: all, every:K, or a list like 0,3,5 (default: the "
                             "`retain` a to-hf-rcla export stores, as from_pretrained uses it; else all)")
    parser.add_argument("--shrink-at", action="append", default=[], metavar="N:RETAIN[,N:RETAIN...]",
                        help="after N new tokens, keep only the layers of RETAIN (a subset of the current set), "
                             "e.g. 256:every:2,512:every:4 or 128:0,4 (repeatable)")
    sampling = SamplingConfig()
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS, help="(default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=sampling.temperature,
                        help="0 = greedy (default: %(default)s)")
    parser.add_argument("--top-k", type=int, default=sampling.top_k,
                        help="sample among the k most likely tokens, 0 = all (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=sampling.top_p,
                        help="nucleus sampling mass, 1 = all (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for sampling (one generator serves the batch: a prompt's samples depend on the "
                             "other prompts beside it, as in transformers)")
    parser.add_argument("--add-bos", action="store_true",
                        help="start each prompt with the bos token, the tokenizer's or the model's (text prompts "
                             "already start with it where the tokenizer adds one, as transformers' tokenizer(text) "
                             "does: Llama's)")
    parser.add_argument("--no-bos", action="store_true",
                        help="do not start text prompts with the bos token the tokenizer adds (for a model trained "
                             "on data prepared without it: megakv-prep adds none unless --prepend-bos)")
    parser.add_argument("--no-eos-stop", action="store_true", help="do not stop at the end-of-sequence token")
    parser.add_argument("--stats", action="store_true",
                        help="also print cache bytes, time to first token and decode tokens/s")
    return parser


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--prompt-ids {text!r}: expected integers separated by spaces or commas") from None


def parse_shrink_at(texts: list[str]) -> list[tuple[int, str]]:
    """'256:every:2,512:0,4' -> [(256, 'every:2'), (512, '0,4')]: a piece without 'N:' continues a layer list."""
    schedule: list[tuple[int, str]] = []
    for text in texts:
        for piece in (p.strip() for p in text.split(",")):
            n, sep, retain = piece.partition(":")
            if sep and n.strip().isdigit() and retain.strip():
                schedule.append((int(n), retain.strip()))
            elif piece.isdigit() and schedule and not schedule[-1][1].startswith(("every", "all")):
                schedule[-1] = (schedule[-1][0], f"{schedule[-1][1]},{piece}")
            else:
                raise ValueError(f"--shrink-at {text!r}: expected N:RETAIN pieces like 256:every:2,512:every:4 or "
                                 f"128:0,4 (N new tokens, then the retained set)")
    return schedule


def continuation_text(tokenizer, prompt: list[int], new: list[int], eos: Sequence[int]) -> str:
    """The text the new tokens add to the prompt: decoded together, so spacing at the seam is right."""
    if new and new[-1] in eos:
        new = new[:-1]
    prefix, whole = tokenizer.decode(prompt), tokenizer.decode(prompt + new)
    return whole[len(prefix):] if whole.startswith(prefix) else tokenizer.decode(new)


def _run(args: argparse.Namespace) -> int:
    from megakv.inference.engine import InferenceEngine
    from megakv.model_paths import default_retain, resolve_model

    apply_runtime_options(args)
    if args.temperature == 0 and (args.top_k or args.top_p != 1.0 or args.seed is not None):
        given = [f for f, on in (("--top-k", args.top_k), ("--top-p", args.top_p != 1.0),
                                 ("--seed", args.seed is not None)) if on]
        verb = "applies" if len(given) == 1 else "apply"
        raise ValueError(f"{', '.join(given)} {verb} to sampling, and --temperature 0 (the default) is greedy "
                         "decoding: add --temperature T > 0 (e.g. 0.8), or drop them")
    if args.add_bos and args.no_bos:
        raise ValueError("--add-bos and --no-bos contradict each other: pass one")
    if args.no_bos and args.prompt_ids is not None:
        raise ValueError("--no-bos applies to text prompts (--prompt-ids are used as given): drop it, or drop the "
                         "bos id from the ids")
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    shrink_at = parse_shrink_at(args.shrink_at)
    sampling = SamplingConfig(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    model, tokenizer_dir = resolve_model(args.model, args.device, DTYPES[args.dtype])
    engine = InferenceEngine(model, args.retain if args.retain is not None else default_retain(args.model))
    tokenizer = None
    if args.prompt is not None:
        if tokenizer_dir is None:
            raise ValueError(f"{args.model} has no tokenizer, so text prompts cannot be encoded: pass --prompt-ids")
        from megakv.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(tokenizer_dir, model.cfg.eos_token_ids)
        prompts = [tokenizer.encode_prompt(text) for text in args.prompt]
        if args.no_bos:
            prompts = [ids[1:] if ids[:1] == [tokenizer.bos_id] else ids for ids in prompts]
    else:
        prompts = [_parse_ids(text) for text in args.prompt_ids]
    if args.add_bos:
        bos = tokenizer.bos_id if tokenizer is not None else model.cfg.bos_token_id
        if bos is None:
            raise ValueError("--add-bos: " + ("the tokenizer has no bos token" if tokenizer is not None else
                                              "the model config names no bos token (model.bos_token_id)"))
        prompts = [ids if ids[:1] == [bos] else [bos, *ids] for ids in prompts]
    vocab = model.cfg.vocab_size
    if any(not 0 <= i < vocab for ids in prompts for i in ids):
        raise ValueError(f"a prompt token id lies outside the model's vocabulary [0, {vocab})")
    if any(not ids for ids in prompts):
        raise ValueError("a prompt encodes to no tokens: give it some text (or use --add-bos)")

    # Every id that ends a sequence: the tokenizer's, then all of the model config's (an imported
    # Llama-3-Instruct lists several, and transformers stops at any of them).
    eos = [tokenizer.eos_id] if tokenizer is not None else []
    eos += [i for i in model.cfg.eos_token_ids if i not in eos]
    # Padded positions are masked out, so any id the embedding has will do (a tokenizer's added [PAD] may not).
    pad_candidates = (getattr(tokenizer, "pad_id", None), *eos[:1], model.cfg.pad_token_id)
    pad = next((i for i in pad_candidates if i is not None and 0 <= i < vocab), 0)
    longest = max(len(ids) for ids in prompts) + args.max_new_tokens - 1  # positions run: not the last token's
    if longest > model.cfg.max_seq_len:
        print(f"megakv-generate: warning: {longest} positions exceed the model's trained context "
              f"({model.cfg.max_seq_len}); quality past it is not guaranteed", file=sys.stderr)
    if shrink_at:  # a bad schedule is refused before any generation
        try:
            engine.shrink_schedule(shrink_at, args.max_new_tokens)
        except ValueError as e:
            raise ValueError(f"--shrink-at: {e}") from None
    if args.stats:  # time a warm engine, as a server would be: the first prefill of its size pays one-time set-up
        engine.generate(prompts[:1], 2)
    result = engine.generate(prompts, args.max_new_tokens, sampling, None if args.no_eos_stop else eos, pad,
                             shrink_at=shrink_at)

    for index, new in enumerate(result.tokens):
        if len(prompts) > 1:
            print(f"--- [{index}] ({result.finish_reasons[index]})")
        if tokenizer is not None:
            print(args.prompt[index] + continuation_text(tokenizer, prompts[index], new, eos))
        else:
            print(" ".join(str(i) for i in new))
    if args.stats:
        s = result.stats
        full = len(model.layers)
        print(f"# retained layers: {list(s.retained)} ({len(s.retained)}/{full} = {len(s.retained) / full:.1%})")
        print(f"# KV cache: {s.cache_bytes_per_token} bytes/token/sequence, {s.cache_bytes} bytes allocated "
              f"(batch {s.batch} x {s.prompt_tokens + args.max_new_tokens - 1} positions, {args.dtype})")
        print(f"# time to first token: {1000 * s.ttft_s:.1f} ms (prompt {s.prompt_tokens} tokens x batch {s.batch}, "
              "warm engine)")
        for change in s.retain_changes:
            print(f"# after {change.after_tokens} new tokens: retained {list(change.retained)}, KV cache "
                  f"{change.cache_bytes_before} -> {change.cache_bytes_after} bytes allocated")
        print(f"# decode: {s.new_tokens - 1} steps, {s.decode_tokens_per_s:.1f} tokens/s over the batch (rows still "
              "generating)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli("megakv-generate", lambda: _run(args))


if __name__ == "__main__":
    sys.exit(main())
