"""One step of DeepSpeed's real pipe engine (gloo processes) against the dense model by hand.

Each micro-batch carries its own plan, chosen to hit the cases a boundary can get wrong: no routing,
every layer routed, a layer right after a boundary reading layer 0, the largest crossing set, and (PP=4)
K/V relayed through middle stages. The gradients every stage computes (its parameter hooks, under
MegaKVModel names) must equal the dense model's, the tied embedding's two copies summed; the loss and
the global grad norm DeepSpeed clips with must equal the dense ones.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import free_port

from megakv.config import MegaKVConfig, ModelConfig
from megakv.model import MegaKVModel
from megakv.parallel.runners import causal_lm_loss
from megakv.routing import RoutingPlan

pytestmark = pytest.mark.distributed

SEED, MICRO, SEQ = 5, 2, 16
PLANS = [RoutingPlan.own(4),  # no routing
         RoutingPlan((0, 0, 1, 2)),  # every layer routed
         RoutingPlan((0, 1, 0, 3)),  # the layer right after the PP2 boundary reads layer 0
         RoutingPlan((0, 1, 0, 1)),  # both layers before the PP2 boundary cross it (the largest set)
         RoutingPlan((0, 1, 2, 0))]  # PP4: layer 0's K/V relayed through two middle stages


def config(pipeline: int, tie: bool, recompute: bool = False) -> MegaKVConfig:
    cfg = MegaKVConfig()
    cfg.model = ModelConfig(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=48,
                            max_seq_len=SEQ, qk_norm=True, family="qwen3", tie_embeddings=tie)
    cfg.train.seed, cfg.train.micro_batch, cfg.train.global_batch = SEED, MICRO, MICRO * len(PLANS)
    cfg.train.precision = "fp32"
    cfg.train.activation_checkpointing = recompute
    cfg.optim.grad_clip = 0.05  # small: clipping is active, so the norm DeepSpeed computes matters
    cfg.parallel.pipeline, cfg.parallel.zero_stage = pipeline, 1
    return cfg


def micro_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 64, (len(PLANS), MICRO, SEQ + 1), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in tokens]


def _worker(rank: int, world: int, port: int, tie: bool, recompute: bool, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from megakv.parallel import init_parallel, shutdown_parallel
    from megakv.parallel.layout import ParallelLayout
    from megakv.parallel.pipeline import dense_name
    from megakv.parallel.wrap import build_runner
    from megakv.train.ds_config import build_ds_config

    cfg = config(world, tie, recompute)
    layout = ParallelLayout.from_env(cfg.parallel)
    ctx = init_parallel(layout, cfg.parallel, "cpu")
    runner = build_runner(cfg, ctx, build_ds_config(cfg, layout.data_parallel))
    grads: dict[str, torch.Tensor] = {}
    for key, param in runner.engine.module.named_parameters():
        name = dense_name(key, cfg.model.n_layers)

        def keep(grad, name=name):
            grads[name] = grads.get(name, 0) + grad.detach().clone()
        param.register_hook(keep)
    result = runner.train_step(micro_batches(), PLANS)
    # numpy, not tensors: torch would pass shared-memory handles that die with this process
    queue.put((rank, {k: g.numpy() for k, g in grads.items()}, result.loss_sum / result.micro_batches,
               result.grad_norm))
    shutdown_parallel()


def dense_reference(tie: bool):
    model = MegaKVModel(config(1, tie).model, init_seed=SEED)
    batches = micro_batches()
    loss = sum(causal_lm_loss(model(x, plan), y) for (x, y), plan in zip(batches, PLANS)) / len(batches)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
    return grads, float(loss), float(norm)


def run_pipeline(world: int, tie: bool, recompute: bool = False):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(_worker, args=(world, free_port(), tie, recompute, queue), nprocs=world, join=False,
                               start_method="spawn")
    # Read before joining: a child cannot exit while its queue data (the gradients) is unread.
    results = [queue.get(timeout=240) for _ in range(world)]
    while not procs.join(timeout=240):
        pass
    return results


def check_against_dense(results, tie: bool) -> None:
    ref_grads, ref_loss, ref_norm = dense_reference(tie)
    summed: dict[str, torch.Tensor] = {}
    for _, grads, loss, norm in results:
        assert loss == pytest.approx(ref_loss, rel=1e-6)  # every stage reports the replica's loss
        assert norm == pytest.approx(ref_norm, rel=1e-5)  # global over stages, the tied weight counted once
        for name, grad in grads.items():
            # tied: the embedding's and the head's contributions add up
            summed[name] = summed.get(name, 0) + torch.from_numpy(grad)
    assert sorted(summed) == sorted(ref_grads)
    for name, grad in ref_grads.items():
        assert torch.allclose(summed[name], grad, rtol=1e-5, atol=1e-7), (name, (summed[name] - grad).abs().max())
    # the first K/V read across a boundary reached its source: layer 0's k_proj got gradient from layer 2
    assert summed["layers.0.attn.k_proj.weight"].abs().sum() > 0


@pytest.mark.parametrize("tie", [False, True])
def test_two_stage_step_equals_the_dense_model(tie):
    check_against_dense(run_pipeline(2, tie), tie)


@pytest.mark.slow
def test_four_stage_step_relays_kv_through_middle_stages():
    check_against_dense(run_pipeline(4, tie=False), tie=False)


def test_two_stage_step_with_activation_checkpointing_equals_the_dense_model():
    # DeepSpeed recomputes each block from its saved inputs (hidden + the K/V it read, the plan tensor)
    check_against_dense(run_pipeline(2, tie=True, recompute=True), tie=True)
