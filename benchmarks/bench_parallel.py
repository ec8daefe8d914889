"""Tensor vs data parallelism on this machine, from one run: tokens/s and collective bytes per step.

Two gloo processes train the demo model shape (d_model 256, 6 layers, 4 heads, vocab 8192, seq 256)
through real DeepSpeed ZeRO-1 engines on the same 8 sequences per step with R-CLA plans:
  dp2  every rank holds the whole model, one micro-batch of 4 per rank;
  tp2  each rank holds half of every layer's heads and MLP (megakv/parallel/tensor_engine.py), both ranks
       see the same 2 micro-batches of 4 (gradient accumulation 2).
Prints tokens/s (timed steps after warm-up) and the payload each rank hands to collectives per step,
split by collective (tp2: almost all of it is the activation all-reduces), then tp2 / dp2 for both. A ring
all-reduce puts about 2 (n-1)/n times its payload on the wire.

The same two processes run the layouts in blocks, `--repeats` blocks each in mirrored order (dp2, tp2,
tp2, dp2, ...), each block with a fresh model and engine, so a change in the machine's load during the run
affects both alike; a layout's tokens/s is its timed tokens over its timed seconds, pooled over its blocks.

  .venv/bin/python benchmarks/bench_parallel.py [--steps 3] [--warmup 1] [--repeats 2]

PP2 has its own benchmark (benchmarks/bench_pipeline.py, real megakv-train runs).
"""

from __future__ import annotations

import argparse
import os
import queue as queue_module
import socket
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megakv.config import ModelConfig  # noqa: E402

DEMO = ModelConfig(vocab_size=8192, d_model=256, n_layers=6, n_heads=4, n_kv_heads=4, ffn_hidden=704, max_seq_len=256)
SEQ, MICRO, GLOBAL = 256, 4, 8
COLLECTIVES = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor", "broadcast", "reduce",
               "all_gather", "reduce_scatter")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _count_collectives(counts: dict[str, int], active: list[bool]) -> None:
    """Wrap torch.distributed's collectives (before DeepSpeed caches them) to add up payload bytes."""
    import torch.distributed as dist

    def wrap(name, original):
        def counted(*args, **kwargs):
            tensor = kwargs.get("tensor", kwargs.get("input", args[1] if name in (
                "reduce_scatter_tensor", "all_gather_into_tensor") and len(args) > 1 else args[0] if args else None))
            group = kwargs.get("group")
            alone = group is not None and dist.get_world_size(group) == 1  # no traffic (ZeRO with one data rank)
            if active[0] and isinstance(tensor, torch.Tensor) and not alone:
                counts[name] += tensor.numel() * tensor.element_size()
            return original(*args, **kwargs)
        return counted

    for name in COLLECTIVES:
        setattr(dist, name, wrap(name, getattr(dist, name)))


def _worker(rank: int, world: int, port: int, order: list[str], steps: int, warmup: int, queue) -> None:
    """One pair of processes runs every block of `order`: a fresh model and engine per block (its grid set as
    DeepSpeed's mpu), `warmup` untimed steps, then `steps` timed ones."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    torch.set_num_threads(1)
    counts: dict[str, int] = defaultdict(int)
    active = [False]
    _count_collectives(counts, active)
    import deepspeed
    import torch.distributed as dist

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    results = [_block(layout, world, steps, warmup, counts, active) for layout in order]
    queue.put((rank, results))
    dist.destroy_process_group()


def _block(layout: str, world: int, steps: int, warmup: int, counts: dict[str, int], active: list[bool]) -> dict:
    import gc

    import torch.distributed as dist
    import torch.nn.functional as F
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from megakv.model import MegaKVModel
    from megakv.parallel.runners import kept_kv
    from megakv.parallel.tensor_engine import (
        build_tensor_parallel_model,
        initialize_tensor_parallel,
        tensor_parallel_grid,
    )
    from megakv.routing import sample_plan

    tensor = 2 if layout == "tp2" else 1
    data_parallel = world // tensor
    grid = tensor_parallel_grid(PipeModelDataParallelTopology(num_pp=1, num_mp=tensor, num_dp=data_parallel))
    model = (build_tensor_parallel_model(DEMO, 1234, grid)[0] if tensor > 1 else MegaKVModel(DEMO, init_seed=1234))
    accumulation = GLOBAL // (MICRO * data_parallel)
    ds_config = {"train_batch_size": GLOBAL, "train_micro_batch_size_per_gpu": MICRO,
                 "gradient_accumulation_steps": accumulation, "zero_optimization": {"stage": 1},
                 "gradient_clipping": 1.0, "steps_per_print": 2**31 - 1,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    engine = initialize_tensor_parallel(model, model.parameters(), ds_config, grid)
    data_rank = grid.get_data_parallel_rank()
    generator = torch.Generator().manual_seed(0)
    started = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            dist.barrier()
            counts.clear()
            active[0], started = True, time.perf_counter()
        tokens = torch.randint(0, DEMO.vocab_size, (GLOBAL, SEQ + 1), generator=generator)
        plans = [sample_plan("rcla", DEMO.n_layers, q_cross=0.5, seed=1, step=step, micro_batch=m)
                 for m in range(GLOBAL // MICRO)]
        keep = kept_kv(plans, data_parallel)
        for local in range(accumulation):
            slot = data_rank * accumulation + local
            rows = tokens[slot * MICRO:(slot + 1) * MICRO]
            logits = engine(rows[:, :-1], plan=plans[slot], keep_kv=keep[local % len(keep)])
            engine.backward(F.cross_entropy(logits.reshape(-1, DEMO.vocab_size), rows[:, 1:].reshape(-1)))
            engine.step()
    active[0] = False
    dist.barrier()
    elapsed = time.perf_counter() - started
    result = {"layout": layout, "seconds": elapsed, "tokens_per_s": steps * GLOBAL * SEQ / elapsed,
              "bytes_per_step": {k: v / steps for k, v in counts.items()}}
    del engine, model
    gc.collect()
    return result


def run(order: list[str], steps: int, warmup: int) -> dict[int, list[dict]]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(_worker, args=(2, _free_port(), order, steps, warmup, queue), nprocs=2, join=False,
                               start_method="spawn")
    results: dict[int, list[dict]] = {}
    while len(results) < 2:
        try:
            rank, result = queue.get(timeout=5)
            results[rank] = result
        except queue_module.Empty:
            procs.join(timeout=0)  # raises ProcessRaisedException / ProcessExitedException if a worker died
    procs.join()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per block")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each block")
    parser.add_argument("--repeats", type=int, default=2, help="blocks of each layout, in mirrored order")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--steps and --repeats must be >= 1 and --warmup >= 0 (nothing would be measured)")  # exits 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    print(f"demo shape, {GLOBAL} x {SEQ} tokens per step, 2 gloo processes, ZeRO-1, fp32, "
          f"{args.repeats} blocks per layout of {args.steps} timed steps after {args.warmup}")
    layouts = ("dp2", "tp2")
    order = [layout for r in range(args.repeats) for layout in (layouts if r % 2 == 0 else layouts[::-1])]
    blocks = run(order, args.steps, args.warmup)[0]
    seconds: dict[str, float] = defaultdict(float)
    payload: dict[str, dict[str, float]] = {layout: defaultdict(float) for layout in layouts}
    for index, block in enumerate(blocks):
        layout = block["layout"]
        seconds[layout] += block["seconds"]
        for name, value in block["bytes_per_step"].items():
            payload[layout][name] += value / args.repeats
        print(f"  block {index + 1}/{len(blocks)} {layout}: {block['tokens_per_s']:8.0f} tokens/s")
    print(f"(load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    rate = {layout: args.repeats * args.steps * GLOBAL * SEQ / seconds[layout] for layout in layouts}
    total = {layout: sum(payload[layout].values()) for layout in layouts}
    for layout in layouts:
        traffic = ", ".join(f"{name} {value / 2**20:.2f} MiB" for name, value in sorted(payload[layout].items()))
        print(f"{layout}: {rate[layout]:8.0f} tokens/s; collective payload per rank per step "
              f"{total[layout] / 2**20:.2f} MiB ({traffic})")
    print(f"tp2 / dp2: tokens/s {rate['tp2'] / rate['dp2']:.2f}, collective payload per step "
          f"{total['tp2'] / total['dp2']:.2f}")


if __name__ == "__main__":
    main()
