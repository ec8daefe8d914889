"""Cost of R-CLA routing in training: forward+backward time under sampled rcla plans vs the all-own plan.

Both variants run interleaved in one process (own, routed, own, routed, ...) on the same model and
batch, so machine noise hits both alike. Prints the median step times and their ratio (goal: <= 1.00:
routing must cost nothing, and skipping the K/V projections nobody reads should make it cheaper).

  python benchmarks/bench_routing.py [--layers 6 --d-model 256 --seq 256 --batch 8 --rounds 30 --q-cross 0.5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megakv.config import ModelConfig
from megakv.model import MegaKVModel
from megakv.routing import RoutingPlan, sample_plan


def step_time(model, ids, plan) -> float:
    start = time.perf_counter()
    logits = model(ids[:, :-1], plan)
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--q-cross", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.rounds < 1 or args.threads < 1:
        parser.error("--rounds and --threads must be >= 1: nothing would be measured")
    torch.set_num_threads(args.threads)

    cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                      n_kv_heads=args.kv_heads, ffn_hidden=int(args.d_model * 8 / 3 // 64 * 64) or 64,
                      max_seq_len=args.seq)
    torch.manual_seed(0)
    model = MegaKVModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    own = RoutingPlan.own(cfg.n_layers)
    for _ in range(3):  # warm-up (allocator, kernels)
        step_time(model, ids, own)
        step_time(model, ids, sample_plan("rcla", cfg.n_layers, q_cross=args.q_cross, seed=0, step=0))

    own_times, routed_times, skipped = [], [], []
    for round_index in range(args.rounds):
        plan = sample_plan("rcla", cfg.n_layers, q_cross=args.q_cross, seed=1, step=round_index)
        skipped.append(1 - sum(plan.kv_needed) / cfg.n_layers)
        pair = [("own", own), ("routed", plan)]
        if round_index % 2:  # alternate which goes first
            pair.reverse()
        for name, p in pair:
            (own_times if name == "own" else routed_times).append(step_time(model, ids, p))

    own_ms, routed_ms = statistics.median(own_times) * 1e3, statistics.median(routed_times) * 1e3
    print(f"model: {cfg.n_layers} layers, d={cfg.d_model}, heads {cfg.n_heads}/{cfg.n_kv_heads}, "
          f"batch {args.batch} x seq {args.seq}, {model.num_parameters() / 1e6:.1f}M params, "
          f"{args.threads} thread(s), {args.rounds} interleaved rounds")
    print(f"all-own plan        : {own_ms:8.1f} ms / fwd+bwd (median)")
    print(f"rcla q_cross={args.q_cross:<5}: {routed_ms:8.1f} ms / fwd+bwd (median); "
          f"K/V projections skipped: {statistics.mean(skipped):.1%} of layers")
    print(f"ratio routed / plain: {routed_ms / own_ms:.3f}  (goal <= 1.00)")


if __name__ == "__main__":
    main()
