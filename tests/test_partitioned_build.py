"""Models larger than one rank: the ZeRO-3 and tensor-parallel builds never hold the whole model on a rank.

Two gloo processes run every check once in a shared module fixture (one spawn, one ~107 MB fp32 model, so the
difference between a dense copy and a half is tens of MB, far above allocator noise) and report numbers through
a queue; each test asserts on its part. References are built in the same process: the dense model for the same
seed (`build_model`, what every rank built before), its first loss, and its tensor slices.

Memory is measured, not inferred: before each build the worker resets the kernel's peak-RSS counter
(`echo 5 > /proc/self/clear_refs` resets VmHWM to the current RSS), and after it reads VmHWM. The difference is
the most resident memory the build itself ever needed on that rank, temporaries included (a dense copy made and
freed inside the build would show). tracemalloc would not see torch's allocations, and ru_maxrss cannot be reset,
so an earlier peak would hide the build's. The dense build is measured the same way, which shows the measure sees
a whole model when one is built.
"""

from __future__ import annotations

import ctypes
import gc
import os
import re
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import TINY_RECIPE, free_port

WORLD = 2
# ~27 M parameters (~107 MB in fp32): 12 blocks of 2.2 M; the largest leaf (one MLP matrix) is 2.4 MB.
BIG_MODEL = ["model.family=qwen3", "model.qk_norm=true", "model.d_model=384", "model.n_layers=12", "model.n_heads=4",
             "model.n_kv_heads=2", "model.ffn_hidden=1536"]
SEED = 7
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _peak_of(build):
    """(result, bytes by which this process's peak RSS rose above its RSS at the start of `build`)."""
    gc.collect()  # an earlier model in reference cycles freed now, not in the middle of this build
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # freed heap back to the OS: the start RSS is live memory only
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = _kib("VmRSS")
    result = build()
    return result, (_kib("VmHWM") - start) * 1024


def _param_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _checks(rank: int, work_dir: str) -> dict:
    from deepspeed import zero
    from safetensors.torch import load_file
    from tensor_helpers import shard_state_dict

    from megakv.config import load_config
    from megakv.model import Block
    from megakv.model_dir import WEIGHTS_FILE, save_model_dir
    from megakv.optim.param_groups import weight_decay_groups
    from megakv.parallel.context import init_parallel, layout_topology
    from megakv.parallel.layout import ParallelLayout
    from megakv.parallel.materialize import (
        SafetensorsWeights,
        build_zero3_model,
        materialize_block_shards,
        skeleton_model,
    )
    from megakv.parallel.runners import causal_lm_loss
    from megakv.parallel.tensor import apply_tensor_parallel_to_blocks
    from megakv.parallel.tensor_engine import build_tensor_parallel_model, tensor_parallel_grid
    from megakv.parallel.tensor_split import split_of
    from megakv.parallel.wrap import build_model, build_runner
    from megakv.routing import sample_plan
    from megakv.train.ds_config import generated_ds_config
    from megakv.train.loop import _init_weights

    out: dict = {}
    cfg = load_config(TINY_RECIPE, [*BIG_MODEL, f"train.seed={SEED}", "parallel.zero_stage=3", "train.global_batch=2",
                                    "train.micro_batch=1"])
    ctx = init_parallel(ParallelLayout(world_size=WORLD, rank=rank, local_rank=rank), cfg.parallel, device="cpu")
    ds_config = generated_ds_config(cfg, WORLD)

    skeleton_model(cfg.model)  # torch's one-time set-up for the meta device (~80 MB, whatever the model size)

    # --- TP2 over both ranks: only the shard is ever materialised, and it equals the slices of the dense build
    grid = tensor_parallel_grid(layout_topology(ParallelLayout(world_size=WORLD, rank=rank, local_rank=rank,
                                                               tensor=WORLD)))
    (tp_model, split), out["tp_peak"] = _peak_of(lambda: build_tensor_parallel_model(cfg.model, SEED, grid))
    out["tp_bytes"] = _param_bytes(tp_model)
    dense, out["dense_peak"] = _peak_of(lambda: build_model(cfg.model, SEED))
    out["full_bytes"] = _param_bytes(dense)
    dense_state = dense.state_dict()
    expected, got = shard_state_dict(dense_state, split, rank), tp_model.state_dict()
    out["tp_differing"] = sorted(n for n in expected if n not in got or not torch.equal(got[n], expected[n]))
    out["tp_unmarked_splits"] = sorted(n for n, p in tp_model.named_parameters()
                                       if split_of(n) is not None and not getattr(p, "tensor_model_parallel", False))
    # Forward and backward against the dense model: the split region's all-reduces and the q/k-norm gradient
    # hooks (which must survive the materialisation) make the TP gradients those of the dense model.
    plan = sample_plan("rcla", cfg.model.n_layers, q_cross=0.7, seed=3, step=0)
    inputs, labels = _tokens(cfg.model.vocab_size, seed=100)  # tensor peers read the same batch
    causal_lm_loss(dense(inputs, plan=plan), labels).backward()
    causal_lm_loss(tp_model(inputs, plan=plan), labels).backward()
    out["tp_grad_diff"] = {n: _rel_diff(tp_model.get_parameter(n).grad, dense.get_parameter(n).grad)
                           for n in ("layers.0.attn.q_norm.weight", "layers.0.attn.k_norm.weight", "embed.weight")}
    del tp_model, got, expected
    dense.zero_grad(set_to_none=True)

    # --- TP x PP: a pipeline stage's blocks are meta skeletons, split, then filled with this rank's heads only
    # (what megakv/parallel/wrap.py does for each stage); a stage of all blocks but layer 0 here
    stage = range(1, cfg.model.n_layers)

    def build_stage():
        with torch.device("meta"):
            blocks = {i: Block(cfg.model) for i in stage}
        stage_split = apply_tensor_parallel_to_blocks(blocks.values(), cfg.model, grid.get_slice_parallel_group(),
                                                      rank, WORLD)
        materialize_block_shards(blocks, cfg.model, stage_split, rank, SEED)
        return blocks

    blocks, out["stage_peak"] = _peak_of(build_stage)
    out["stage_bytes"] = sum(_param_bytes(b) for b in blocks.values())
    stage_dense = {n: t for n, t in dense_state.items() if n.startswith("layers.") and int(n.split(".")[1]) in stage}
    out["stage_dense_bytes"] = sum(t.numel() * t.element_size() for t in stage_dense.values())
    got = {f"layers.{i}.{k}": v for i, b in blocks.items() for k, v in b.state_dict().items()}
    expected = shard_state_dict(stage_dense, split, rank)
    out["stage_differing"] = sorted(n for n in expected if n not in got or not torch.equal(got[n], expected[n]))
    out["stage_unmarked_splits"] = sorted(f"layers.{i}.{n}" for i, b in blocks.items() for n, p in b.named_parameters()
                                          if split_of(n) is not None and not getattr(p, "tensor_model_parallel", False))
    del blocks, got, expected, stage_dense

    # --- ZeRO-3: the partitioned build, then every parameter gathered and compared bitwise with the dense one
    model, out["zero3_peak"] = _peak_of(lambda: build_zero3_model(cfg.model, SEED, ds_config))
    out["zero3_local_bytes"] = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    differing = []
    for name, param in model.named_parameters():
        with zero.GatheredParameters([param]):
            if not torch.equal(param.data, dense_state[name]):
                differing.append(name)
    out["zero3_differing"] = differing
    out["zero3_names"] = sorted(n for n, _ in model.named_parameters()) == sorted(dense_state)

    def decay_groups(m) -> dict[str, list[str]]:
        return {g["name"]: names_of(g, m) for g in weight_decay_groups(m, cfg.optim)}

    out["decay_groups_equal"] = decay_groups(model) == decay_groups(dense)
    del model

    # --- checkpoint.init_from under ZeRO-3: the model directory is read one tensor at a time into the partitions
    model_dir = Path(work_dir) / "model"
    if rank == 0:  # weights unlike the seed's, so a build that ignored them would show
        save_model_dir(cfg.model, {n: t * 1.5 + 0.25 for n, t in dense_state.items()}, model_dir)
    torch.distributed.barrier()
    model, out["init_from_peak"] = _peak_of(
        lambda: build_zero3_model(cfg.model, SEED, ds_config, _init_weights(cfg, str(model_dir))))
    saved = load_file(str(model_dir / WEIGHTS_FILE))
    differing = []
    for name, param in model.named_parameters():
        with zero.GatheredParameters([param]):
            if not torch.equal(param.data, saved[name]):
                differing.append(name)
    out["init_from_differing"] = differing
    del model
    # ... and under TP (checkpoint.init_from with parallel.tensor=2 reads the directory the same way)
    tp_cfg = load_config(TINY_RECIPE, [*BIG_MODEL, "parallel.tensor=2", "train.global_batch=2", "train.micro_batch=1"])
    lazy = _init_weights(tp_cfg, str(model_dir))
    out["tp_init_from_lazy"] = isinstance(lazy, SafetensorsWeights)
    (tp_model, split), out["tp_init_from_peak"] = _peak_of(lambda: build_tensor_parallel_model(cfg.model, SEED, grid,
                                                                                               lazy))
    expected, got = shard_state_dict(saved, split, rank), tp_model.state_dict()
    out["tp_init_from_differing"] = sorted(n for n in expected if not torch.equal(got[n], expected[n]))
    del tp_model, saved, expected, got

    # --- the real ZeRO-3 path (build_runner -> partitioned build -> engine): its first loss is the dense one's
    inputs, labels = _tokens(cfg.model.vocab_size, seed=200 + rank)  # each data-parallel rank its own batch
    with torch.no_grad():
        dense_loss = causal_lm_loss(dense(inputs, plan=plan), labels)
    runner = build_runner(cfg, ctx, ds_config)
    out["runner_params_partitioned"] = all(hasattr(p, "ds_id") for p in runner.engine.module.parameters())
    result = runner.train_step([(inputs, labels)], [plan])
    out["first_loss"], out["dense_loss"] = result.loss_sum, float(dense_loss)
    return out


def _rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _tokens(vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(0, vocab, (1, 17), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def names_of(group: dict, model) -> list[str]:
    ids = {id(p) for p in group["params"]}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def _worker(rank: int, port: int, work_dir: str, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    # Large allocations always mmap'd and returned on free (glibc otherwise raises its mmap threshold up to
    # 32 MB after the first free, and the heap fragments between freed dense leaves and new partitions): the
    # regime of a model whose leaves are above 32 MB, the models this build is for.
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    from megakv.parallel.context import shutdown_parallel

    try:
        queue.put((rank, _checks(rank, work_dir)))
    except BaseException as e:  # report instead of hanging the parent on queue.get
        queue.put((rank, {"error": repr(e)}))
        raise
    finally:
        shutdown_parallel()


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    work_dir = str(tmp_path_factory.mktemp("partitioned_build"))
    procs = mp.start_processes(_worker, args=(free_port(), work_dir, queue), nprocs=WORLD, join=False,
                               start_method="spawn")
    results = dict(queue.get(timeout=300) for _ in range(WORLD))
    procs.join()
    for rank, result in results.items():
        assert "error" not in result, f"rank {rank}: {result['error']}"
    return results


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_build_peaks_well_under_the_full_model(results):
    for rank, r in results.items():
        full = r["full_bytes"]
        assert full > 100e6  # the model is big enough for the figures below to be unambiguous
        # The measure sees a whole model when one is built ...
        assert r["dense_peak"] >= 0.95 * full, (rank, r["dense_peak"], full)
        # ... and the partitioned build holds this rank's half plus at most a leaf or two at a time.
        assert r["zero3_local_bytes"] == pytest.approx(full / WORLD, rel=0.01)
        assert r["zero3_peak"] < 0.6 * full, (rank, r["zero3_peak"], full)


@pytest.mark.distributed
@pytest.mark.slow
def test_zero3_build_equals_the_dense_build_and_its_first_loss(results):
    for rank, r in results.items():
        assert r["zero3_names"] and r["zero3_differing"] == [], (rank, r["zero3_differing"][:5])
        assert r["decay_groups_equal"], rank  # a flat partition must not turn a matrix into a "norm"
        assert r["runner_params_partitioned"], rank
        assert r["first_loss"] == pytest.approx(r["dense_loss"], rel=1e-6), (rank, r["first_loss"], r["dense_loss"])
    assert results[0]["dense_loss"] != results[1]["dense_loss"]  # each rank's own micro-batch


@pytest.mark.distributed
@pytest.mark.slow
def test_tensor_parallel_build_materialises_only_the_shard(results):
    for rank, r in results.items():
        full, shard = r["full_bytes"], r["tp_bytes"]
        assert shard < 0.6 * full, (rank, shard, full)  # the blocks are split, embedding/head/norms replicated
        assert r["tp_peak"] < shard + 0.1 * full, (rank, r["tp_peak"], shard, full)
        assert r["tp_differing"] == [] and r["tp_unmarked_splits"] == [], (rank, r["tp_differing"][:5])
        assert max(r["tp_grad_diff"].values()) <= 1e-5, (rank, r["tp_grad_diff"])


@pytest.mark.distributed
@pytest.mark.slow
def test_a_tensor_split_pipeline_stage_materialises_only_its_shard(results):
    for rank, r in results.items():
        dense, shard = r["stage_dense_bytes"], r["stage_bytes"]
        assert shard < 0.6 * dense, (rank, shard, dense)  # every block matrix is split; only norms replicated
        assert r["stage_peak"] < shard + 0.1 * dense, (rank, r["stage_peak"], shard, dense)  # never the dense stage
        assert r["stage_differing"] == [] and r["stage_unmarked_splits"] == [], (rank, r["stage_differing"][:5])


@pytest.mark.distributed
@pytest.mark.slow
def test_init_from_reads_the_model_directory_into_the_partitions_and_shards(results):
    for rank, r in results.items():
        assert r["init_from_differing"] == [], (rank, r["init_from_differing"][:5])
        assert r["init_from_peak"] < 0.6 * r["full_bytes"], (rank, r["init_from_peak"], r["full_bytes"])
        assert r["tp_init_from_lazy"] and r["tp_init_from_differing"] == [], (rank, r["tp_init_from_differing"][:5])
        assert r["tp_init_from_peak"] < r["tp_bytes"] + 0.1 * r["full_bytes"], (rank, r["tp_init_from_peak"])


def test_model_directory_weights_read_one_tensor_at_a_time_and_refuse_what_does_not_fit(tmp_path):
    from safetensors.torch import load_file

    from megakv.config import ModelConfig
    from megakv.model import MegaKVModel
    from megakv.model_dir import WEIGHTS_FILE, save_model_dir
    from megakv.parallel.materialize import SafetensorsWeights

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=16)
    save_model_dir(cfg, MegaKVModel(cfg, init_seed=1).to(torch.bfloat16).state_dict(), tmp_path / "m")
    path = tmp_path / "m" / WEIGHTS_FILE
    weights, saved = SafetensorsWeights(path, cfg), load_file(str(path))
    assert sorted(weights) == sorted(saved) and len(weights) == len(saved)
    assert all(weights[n].dtype == torch.bfloat16 and torch.equal(weights[n], saved[n]) for n in saved)
    with pytest.raises(ValueError, match=r"do not match the model config \(layers.0.mlp.down_proj.weight is "
                                         r"\(32, 48\), the config implies \(32, 64\)\).*config.yaml"):
        SafetensorsWeights(path, ModelConfig(**{**cfg.__dict__, "ffn_hidden": 64}))
    with pytest.raises(ValueError, match=r"missing \['layers.2"):
        SafetensorsWeights(path, ModelConfig(**{**cfg.__dict__, "n_layers": 3}))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt safetensors file.*copy the model directory again"):
        SafetensorsWeights(truncated, cfg)
    truncated.write_bytes(path.read_bytes()[:5])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        SafetensorsWeights(truncated, cfg)
