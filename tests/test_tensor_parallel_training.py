"""TP x DP training through real DeepSpeed engines (ZeRO 1 and 2, gloo) against the single-process run.

Each layout trains the same model on the same global batches with the same per-micro-batch R-CLA plans
and a small explicit gradient clip that is active at every step, so a wrong global grad norm would change
the update. Compared step by step: the loss, the grad norm DeepSpeed clipped with, and at the end the
merged (dense) weights.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import free_port

from megakv.config import ConfigError, ModelConfig
from megakv.parallel.tensor_engine import check_tensor_zero_stage
from megakv.routing import sample_plan

pytestmark = pytest.mark.distributed

# GQA with q/k norms and untied head, MQA (K/V head replicated on both tensor ranks) with tied embeddings.
MODELS = {
    "gqa": ModelConfig(family="qwen3", vocab_size=64, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2,
                       ffn_hidden=48, max_seq_len=16, qk_norm=True),
    "mqa": ModelConfig(family="qwen3", vocab_size=64, d_model=32, n_layers=6, n_heads=4, n_kv_heads=1,
                       ffn_hidden=48, max_seq_len=16, qk_norm=True, qkv_bias=True, out_bias=True,
                       tie_embeddings=True),
}
STEPS, SEQ, MICRO, MICRO_BATCHES, CLIP, SEED = 4, 8, 2, 2, 0.05, 11


def _global_batch(step: int, vocab: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, vocab, (MICRO * MICRO_BATCHES, SEQ + 1), generator=generator)


def _plan(step: int, micro_batch: int, n_layers: int):
    return sample_plan("rcla", n_layers, q_cross=0.7, seed=SEED, step=step, micro_batch=micro_batch)


def _train_worker(rank: int, world: int, port: int, model_name: str, tensor: int, zero_stage: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    import deepspeed
    import torch.distributed as dist
    import torch.nn.functional as F
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from tensor_helpers import gather_dense_state_dict

    from megakv.model import MegaKVModel
    from megakv.parallel.runners import kept_kv
    from megakv.parallel.tensor_engine import (
        build_tensor_parallel_model,
        initialize_tensor_parallel,
        tensor_parallel_grid,
    )

    torch.set_num_threads(1)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    try:
        cfg = MODELS[model_name]
        data_parallel = world // tensor
        grid = tensor_parallel_grid(PipeModelDataParallelTopology(num_pp=1, num_mp=tensor, num_dp=data_parallel))
        if tensor > 1:
            model, split = build_tensor_parallel_model(cfg, SEED, grid)
        else:
            model, split = MegaKVModel(cfg, init_seed=SEED), None
        ds_config = {
            "train_batch_size": MICRO * MICRO_BATCHES, "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": MICRO_BATCHES // data_parallel,
            "zero_optimization": {"stage": zero_stage}, "gradient_clipping": CLIP, "steps_per_print": 10**9,
            "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1, "torch_adam": True}},
        }
        engine = initialize_tensor_parallel(model, model.parameters(), ds_config, grid)
        data_rank, accumulation = grid.get_data_parallel_rank(), MICRO_BATCHES // data_parallel
        losses, norms = [], []
        for step in range(STEPS):
            tokens = _global_batch(step, cfg.vocab_size)
            plans = [_plan(step, m, cfg.n_layers) for m in range(MICRO_BATCHES)]
            # Data replicas with other plans still project the same K/V (ZeRO reduces the same gradients).
            keep = kept_kv(plans, data_parallel)
            loss_sum = torch.zeros(())
            for local in range(accumulation):
                micro_batch = data_rank * accumulation + local
                rows = tokens[micro_batch * MICRO:(micro_batch + 1) * MICRO]
                logits = engine(rows[:, :-1], plan=plans[micro_batch], keep_kv=keep[local % len(keep)])
                loss = F.cross_entropy(logits.reshape(-1, cfg.vocab_size), rows[:, 1:].reshape(-1))
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach()
            dist.all_reduce(loss_sum, group=grid.get_data_parallel_group())
            losses.append(float(loss_sum) / MICRO_BATCHES)
            norms.append(float(engine.get_global_grad_norm()))
        module = engine.module
        state = (gather_dense_state_dict(module, grid.get_slice_parallel_group(), split) if tensor > 1
                 else {k: v.detach().clone() for k, v in module.state_dict().items()})
        # numpy, not tensors: a tensor through the queue is shared memory that dies with this process
        state = {k: v.numpy().copy() for k, v in state.items()} if rank == 0 else None
        queue.put((rank, {"losses": losses, "norms": norms, "state": state}))
    except BaseException as e:  # report instead of leaving the parent waiting
        queue.put((rank, {"error": repr(e)}))
        raise
    finally:
        dist.barrier()
        dist.destroy_process_group()


def _run(model_name: str, world: int, tensor: int, zero_stage: int) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(_train_worker, args=(world, free_port(), model_name, tensor, zero_stage, queue),
                               nprocs=world, join=False, start_method="spawn")
    results = dict(queue.get(timeout=300) for _ in range(world))
    procs.join()
    for rank, result in results.items():
        assert "error" not in result, f"rank {rank}: {result['error']}"
    return results


def _runner_worker(rank: int, world: int, port: int, tensor: int, queue) -> None:
    """The training loop's own path: init_parallel's context, the StepRunner, the generated DeepSpeed JSON."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_SIZE=str(world))
    from megakv.config import MegaKVConfig, OptimConfig, ParallelConfig, TrainConfig
    from megakv.parallel import ParallelLayout, init_parallel, shutdown_parallel
    from megakv.parallel.wrap import build_runner
    from megakv.train.ds_config import build_ds_config

    torch.set_num_threads(1)
    cfg = MegaKVConfig(model=MODELS["mqa"], optim=OptimConfig(lr=3e-3, warmup_steps=1, grad_clip=CLIP),
                       train=TrainConfig(steps=STEPS, global_batch=MICRO * MICRO_BATCHES, micro_batch=MICRO, seed=SEED),
                       parallel=ParallelConfig(tensor=tensor, zero_stage=2))
    layout = ParallelLayout.from_env(cfg.parallel)
    ctx = init_parallel(layout, cfg.parallel, "cpu")
    try:
        ds_config = build_ds_config(cfg, layout.data_parallel)
        runner = build_runner(cfg, ctx, ds_config)
        losses, norms, rates = [], [], []
        for step in range(STEPS):
            tokens = _global_batch(step, cfg.model.vocab_size)
            batches = [(tokens[m * MICRO:(m + 1) * MICRO, :-1], tokens[m * MICRO:(m + 1) * MICRO, 1:])
                       for m in range(MICRO_BATCHES)]
            result = runner.train_step(batches, [_plan(step, m, cfg.model.n_layers) for m in range(MICRO_BATCHES)])
            losses.append(result.loss_sum / result.micro_batches)
            norms.append(result.grad_norm)
            rates.append(runner.learning_rate())
        queue.put((rank, {"losses": losses, "norms": norms, "rates": rates}))
    except BaseException as e:
        queue.put((rank, {"error": repr(e)}))
        raise
    finally:
        shutdown_parallel()


def _run_runner(world: int, tensor: int) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(_runner_worker, args=(world, free_port(), tensor, queue), nprocs=world, join=False,
                               start_method="spawn")
    results = dict(queue.get(timeout=300) for _ in range(world))
    procs.join()
    for rank, result in results.items():
        assert "error" not in result, f"rank {rank}: {result['error']}"
    return results


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    """The single-process run of each model, made once (on one process ZeRO 1 and 2 have nothing to split)."""
    return {}


def _reference(references, model_name: str) -> dict:
    if model_name not in references:
        references[model_name] = _run(model_name, world=1, tensor=1, zero_stage=1)[0]
    return references[model_name]


def _assert_same_training(run: dict[int, dict], reference: dict) -> None:
    assert all(norm > CLIP for norm in reference["norms"]), "the clip must be active for the test to mean anything"
    for rank, result in run.items():
        for step, (ours, ref) in enumerate(zip(result["losses"], reference["losses"], strict=True)):
            assert abs(ours / ref - 1) <= 1e-6, f"rank {rank} step {step}: loss {ours} vs {ref}"
        for step, (ours, ref) in enumerate(zip(result["norms"], reference["norms"], strict=True)):
            assert abs(ours / ref - 1) <= 1e-6, f"rank {rank} step {step}: grad norm {ours} vs {ref}"
    state = run[0]["state"]
    assert state.keys() == reference["state"].keys()
    worst = max(float(abs(state[k] - v).max()) for k, v in reference["state"].items())
    # Adam divides by sqrt(v): for entries with tiny gradients it turns fp32 rounding differences (1e-9) into
    # update differences of up to ~1e-3 x lr (3e-3 here, measured 3.5e-6); a wrong shard or norm moves
    # entries by ~lr.
    assert worst <= 2e-5, f"merged weights differ from the single-process run by {worst}"


@pytest.mark.slow  # ~20-40 s each on 2 cores (DeepSpeed start-up in every process)
@pytest.mark.parametrize("model_name", MODELS)
@pytest.mark.parametrize("zero_stage", [1, 2])
def test_tp2_training_equals_single_process(references, model_name, zero_stage):
    _assert_same_training(_run(model_name, world=2, tensor=2, zero_stage=zero_stage),
                          _reference(references, model_name))


@pytest.mark.slow
def test_tp2_dp2_training_equals_single_process(references):
    _assert_same_training(_run("mqa", world=4, tensor=2, zero_stage=2), _reference(references, "mqa"))


def test_zero3_with_tensor_parallelism_is_refused_early():
    with pytest.raises(ConfigError, match="ZeRO-3 is not supported with tensor parallelism"):
        check_tensor_zero_stage(3, 2)
    check_tensor_zero_stage(3, 1)
    check_tensor_zero_stage(2, 2)


@pytest.mark.slow
def test_tp2_step_runner_equals_the_dense_runner():
    """wrap.build_runner with parallel.tensor=2 (tensor_data_runner) against its dense data-parallel runner."""
    reference = _run_runner(world=1, tensor=1)[0]
    assert all(norm > CLIP for norm in reference["norms"])
    for rank, result in _run_runner(world=2, tensor=2).items():
        assert result["rates"] == reference["rates"]
        for step in range(STEPS):
            assert abs(result["losses"][step] / reference["losses"][step] - 1) <= 1e-6, (rank, step, result)
            assert abs(result["norms"][step] / reference["norms"][step] - 1) <= 1e-6, (rank, step, result)
