"""Head-split tensor parallelism against the dense model: layers, whole models under routing, shards.

Two gloo processes (torch.distributed only, no DeepSpeed) run every check once in a shared module fixture
and return numbers through a queue; each test asserts on its part. The reference is always the dense
model built from the same seed in the same process.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.multiprocessing as mp
from tensor_helpers import gather_dense_state_dict, shard_state_dict
from train_helpers import free_port, parse_plan

from megakv.config import ConfigError, ModelConfig
from megakv.model import MegaKVModel
from megakv.parallel.tensor_split import merge_state_dicts, tensor_split, valid_tensor_degrees
from megakv.routing import sample_plan

TP = 2
# GQA with split K/V heads (one per rank) and q/k norms; MQA with its K/V head replicated on both ranks,
# biases everywhere and tied embeddings.
MODELS = {
    "gqa": ModelConfig(family="qwen3", vocab_size=64, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2,
                       ffn_hidden=48, max_seq_len=16, qk_norm=True),
    "mqa": ModelConfig(family="qwen3", vocab_size=64, d_model=32, n_layers=6, n_heads=4, n_kv_heads=1,
                       ffn_hidden=48, max_seq_len=16, qk_norm=True, qkv_bias=True, out_bias=True,
                       tie_embeddings=True),
}
# Plans that route across many layers (layer 5 reads layer 0), chains of routed sources, and sampled R-CLA.
PLANS = ["0 0 1 0 2 0", "0 1 1 1 1 4", "0 0 0 0 0 0"] + [
    str(sample_plan("rcla", 6, q_cross=0.7, seed=3, step=s)) for s in range(3)]

pytestmark = pytest.mark.distributed


def _perturbed_model(cfg: ModelConfig) -> MegaKVModel:
    """Dense model with non-trivial norms and biases, so every gradient path carries signal."""
    torch.manual_seed(0)
    model = MegaKVModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def _layer_checks(rank: int, group) -> dict[str, float]:
    from torch import nn

    from megakv.parallel.tensor import ColumnParallelLinear, RowParallelLinear

    torch.manual_seed(5)
    out: dict[str, float] = {}
    # Column-parallel: rank r computes output rows [4r, 4r + 4) of a 12 -> 8 linear.
    dense = nn.Linear(12, 8)
    x, dy = torch.randn(3, 5, 12), torch.randn(3, 5, 8)
    rows = slice(4 * rank, 4 * rank + 4)
    col = ColumnParallelLinear(dense.weight.detach()[rows].clone(), dense.bias.detach()[rows].clone(), group)
    x_par, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_par, y_ref = col(x_par), dense(x_ref)
    (y_par * dy[..., rows]).sum().backward()
    (y_ref * dy).sum().backward()
    out["column/forward"] = _max_diff(y_par, y_ref[..., rows])
    out["column/input_grad"] = _max_diff(x_par.grad, x_ref.grad)
    out["column/weight_grad"] = _max_diff(col.weight.grad, dense.weight.grad[rows])
    out["column/bias_grad"] = _max_diff(col.bias.grad, dense.bias.grad[rows])
    # Row-parallel: rank r holds input columns [4r, 4r + 4) of an 8 -> 12 linear; the bias is replicated.
    dense = nn.Linear(8, 12)
    x, dy = torch.randn(3, 5, 8), torch.randn(3, 5, 12)
    cols = slice(4 * rank, 4 * rank + 4)
    row = RowParallelLinear(dense.weight.detach()[:, cols].clone(), dense.bias.detach().clone(), group)
    x_par, x_ref = x[..., cols].clone().requires_grad_(), x.clone().requires_grad_()
    y_par, y_ref = row(x_par), dense(x_ref)
    (y_par * dy).sum().backward()
    (y_ref * dy).sum().backward()
    out["row/forward"] = _max_diff(y_par, y_ref)
    out["row/input_grad"] = _max_diff(x_par.grad, x_ref.grad[..., cols])
    out["row/weight_grad"] = _max_diff(row.weight.grad, dense.weight.grad[:, cols])
    out["row/bias_grad"] = _max_diff(row.bias.grad, dense.bias.grad)
    return out


def _grad_kind(name: str, split) -> str:
    from megakv.parallel.tensor_split import split_of

    if "q_norm" in name or "k_norm" in name:
        return "qk_norm"
    where = split_of(name)
    if where is None:
        return "replicated"
    return "kv" if where[0] == "kv" else "split"


def _count_all_reduces(model, ids, plan, backward: bool = False) -> int:
    """All-reduces of activation-sized tensors in one forward (or in its backward)."""
    import torch.distributed as dist

    calls = []
    original = dist.all_reduce

    def counting(tensor, *args, **kwargs):
        calls.append(tuple(tensor.shape))
        return original(tensor, *args, **kwargs)

    logits = model(ids, plan=plan)
    dist.all_reduce = counting
    try:
        if backward:
            logits.sum().backward()
        else:
            with torch.no_grad():
                model(ids, plan=plan)
    finally:
        dist.all_reduce = original
    model.zero_grad()
    return sum(shape == (*ids.shape, model.cfg.d_model) for shape in calls)


def _model_checks(cfg: ModelConfig, rank: int, group) -> dict:
    import torch.distributed as dist
    import torch.nn.functional as F

    from megakv.parallel.tensor import apply_tensor_parallel
    from megakv.parallel.tensor_split import shard_tensor, split_of

    dense = _perturbed_model(cfg)
    parallel = copy.deepcopy(dense)
    split = apply_tensor_parallel(parallel, group, rank, TP)
    generator = torch.Generator().manual_seed(1)
    out: dict = {"logits": 0.0, "loss_rel": 0.0}
    # Gradients accumulate over all plans, as over the micro-batches of one step.
    for plan_text in PLANS:
        plan = parse_plan(plan_text)
        ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=generator)
        labels = torch.randint(0, cfg.vocab_size, (2, 9), generator=generator)
        logits_par, logits_ref = parallel(ids, plan=plan), dense(ids, plan=plan)
        loss_par = F.cross_entropy(logits_par.reshape(-1, cfg.vocab_size), labels.reshape(-1))
        loss_ref = F.cross_entropy(logits_ref.reshape(-1, cfg.vocab_size), labels.reshape(-1))
        loss_par.backward()
        loss_ref.backward()
        out["logits"] = max(out["logits"], _max_diff(logits_par, logits_ref))
        out["loss_rel"] = max(out["loss_rel"], abs(float(loss_par) / float(loss_ref) - 1))
    dense_grads = {name: p.grad for name, p in dense.named_parameters()}
    grad_diff: dict[str, float] = {}
    replicas_equal = True
    unused = [name for name, grad in dense_grads.items() if grad is None]  # K/V no plan reads
    out["unused_match"] = unused == [name for name, p in parallel.named_parameters() if p.grad is None]
    for name, p in parallel.named_parameters():
        if name in unused:
            continue
        kind = _grad_kind(name, split)
        expected = shard_tensor(name, dense_grads[name], split, rank)
        grad_diff[kind] = max(grad_diff.get(kind, 0.0), _max_diff(p.grad, expected))
        gathered = [torch.empty_like(p.grad) for _ in range(TP)]
        dist.all_gather(gathered, p.grad.contiguous(), group=group)
        where = split_of(name)
        if where is None:  # replicated: the same gradient, bit for bit, on every rank
            replicas_equal &= all(torch.equal(g, gathered[0]) for g in gathered)
        elif where[0] == "kv" and split.kv_replicas > 1:
            replicas_equal &= all(torch.equal(g, gathered[split.kv_group(r) * split.kv_replicas])
                                  for r, g in enumerate(gathered))
    out["grad"] = grad_diff
    out["replicas_equal"] = replicas_equal
    out["kv_replicas"] = split.kv_replicas
    dense_state = dense.state_dict()
    out["shard_exact"] = all(torch.equal(value, shard_state_dict(dense_state, split, rank)[name])
                             for name, value in parallel.state_dict().items())
    merged = gather_dense_state_dict(parallel, group, split)
    out["merge_exact"] = merged.keys() == dense_state.keys() and all(
        torch.equal(merged[name], value) for name, value in dense_state.items())
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=generator)
    out["all_reduces"] = {text: _count_all_reduces(parallel, ids, parse_plan(text))
                          for text in ("0 1 2 3 4 5", "0 0 1 0 2 0")}
    out["backward_all_reduces"] = {text: _count_all_reduces(parallel, ids, parse_plan(text), backward=True)
                                   for text in ("0 1 2 3 4 5", "0 0 1 0 2 0")}
    out["marked"] = sorted(name for name, p in parallel.named_parameters()
                           if getattr(p, "tensor_model_parallel", False))
    return out


def _worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    try:
        results = {"layers": _layer_checks(rank, group)}
        for name, cfg in MODELS.items():
            results[name] = _model_checks(cfg, rank, group)
        queue.put((rank, results))
    except BaseException as e:  # report instead of hanging the parent on queue.get
        queue.put((rank, {"error": repr(e)}))
        raise
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_results() -> dict[int, dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = mp.start_processes(_worker, args=(TP, free_port(), queue), nprocs=TP, join=False, start_method="spawn")
    results = dict(queue.get(timeout=240) for _ in range(TP))
    procs.join()
    for rank, result in results.items():
        assert "error" not in result, f"rank {rank}: {result['error']}"
    return results


def test_parallel_linears_equal_dense(tp_results):
    for rank, result in tp_results.items():
        for check, diff in result["layers"].items():
            assert diff <= 1e-6, f"rank {rank} {check}: {diff}"


@pytest.mark.parametrize("model", MODELS)
def test_tp_model_forward_and_gradients_equal_dense_under_routing(tp_results, model):
    for rank, result in tp_results.items():
        r = result[model]
        assert r["logits"] <= 1e-6 and r["loss_rel"] <= 1e-6, (rank, r["logits"], r["loss_rel"])
        expected_kinds = {"split", "kv", "qk_norm", "replicated"}
        assert set(r["grad"]) == expected_kinds and r["unused_match"]
        for kind, diff in r["grad"].items():  # qk_norm: the norm grads summed over the tensor group
            assert diff <= 1e-6, f"rank {rank} {model} {kind} grads differ from dense by {diff}"


def test_mqa_replicates_its_single_kv_head():
    assert tensor_split(MODELS["mqa"], TP).kv_replicas == 2
    assert tensor_split(MODELS["gqa"], TP).kv_replicas == 1


@pytest.mark.parametrize("model", MODELS)
def test_replicated_parameters_get_bitwise_equal_gradients(tp_results, model):
    assert all(result[model]["replicas_equal"] for result in tp_results.values())


@pytest.mark.parametrize("model", MODELS)
def test_shards_slice_and_merge_exactly(tp_results, model):
    for result in tp_results.values():
        assert result[model]["shard_exact"] and result[model]["merge_exact"]


def test_routed_layers_read_kv_without_communication(tp_results):
    """All-reduces are one per attention and one per MLP each way, whichever K/V each layer reads."""
    for result in tp_results.values():
        for model, cfg in MODELS.items():
            assert set(result[model]["all_reduces"].values()) == {2 * cfg.n_layers}
            # Input grads: one all-reduce where attention's q/k/v and one where the MLP's gate/up read.
            assert set(result[model]["backward_all_reduces"].values()) == {2 * cfg.n_layers}


def test_deepspeed_norm_marks(tp_results):
    """Split weights count on every rank; a replicated K/V head only on the first rank holding it."""
    for model in MODELS:
        marked = {rank: result[model]["marked"] for rank, result in tp_results.items()}
        kv = [n for n in marked[0] if ".k_proj." in n or ".v_proj." in n]
        assert any(".q_proj.weight" in n for n in marked[1]) and any(".down_proj.weight" in n for n in marked[1])
        assert not any("norm" in n or n.startswith("embed") or "o_proj.bias" in n for n in marked[0])
        if model == "mqa":
            assert kv and not any(".k_proj." in n or ".v_proj." in n for n in marked[1])
        else:
            assert kv and kv == [n for n in marked[1] if ".k_proj." in n or ".v_proj." in n]


# --- pure checks: no processes ---

def test_tensor_degree_errors_name_the_field_and_the_fix():
    cfg = ModelConfig(n_heads=6, n_kv_heads=3, d_model=48, ffn_hidden=96)
    with pytest.raises(ConfigError) as e:
        tensor_split(cfg, 2)
    message = str(e.value)
    assert "parallel.tensor" in message and "n_kv_heads=3" in message and "[1, 3, 6]" in message
    with pytest.raises(ConfigError, match="n_heads=6 is not divisible"):
        tensor_split(cfg, 4)
    with pytest.raises(ConfigError, match="ffn_hidden=100"):
        tensor_split(ModelConfig(n_heads=4, n_kv_heads=4, ffn_hidden=100), 8)
    assert valid_tensor_degrees(ModelConfig(n_heads=8, n_kv_heads=2, d_model=64, ffn_hidden=128)) == [1, 2, 4, 8]
    assert tensor_split(ModelConfig(n_heads=8, n_kv_heads=2, d_model=64), 8).kv_replicas == 4


def test_merge_refuses_diverged_replicas():
    cfg = MODELS["mqa"]
    dense = _perturbed_model(cfg).state_dict()
    split = tensor_split(cfg, TP)
    shards = [shard_state_dict(dense, split, rank) for rank in range(TP)]
    merged = merge_state_dicts(shards, split)
    assert all(torch.equal(merged[k], v) for k, v in dense.items())
    shards[1]["layers.2.attn.k_proj.weight"][0, 0] += 1e-3
    with pytest.raises(ValueError, match="K/V replica layers.2.attn.k_proj.weight differs"):
        merge_state_dicts(shards, split)
    shards = [shard_state_dict(dense, split, rank) for rank in range(TP)]
    shards[1]["norm.weight"][0] += 1e-3
    with pytest.raises(ValueError, match="replicated parameter norm.weight differs"):
        merge_state_dicts(shards, split)


def test_launch_refuses_a_tensor_degree_the_heads_do_not_split(tmp_path):
    """Checked in preflight, before data files, process groups or DeepSpeed."""
    from train_helpers import TINY_RECIPE

    from megakv.config import load_config
    from megakv.parallel.layout import ParallelLayout
    from megakv.train.preflight import preflight

    cfg = load_config(TINY_RECIPE, ["parallel.tensor=3", f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError) as e:
        preflight(cfg, ParallelLayout(world_size=3, rank=0, local_rank=0))
    assert e.value.field == "parallel.tensor" and "model.n_heads=4" in str(e.value) and "[1, 2, 4]" in str(e.value)


def test_tensor_groups_spanning_nodes_are_warned_about():
    from megakv.parallel.layout import ParallelLayout, tensor_group_spread_warning

    def warning(world, per_node, tensor):
        layout = ParallelLayout(world_size=world, rank=0, local_rank=0, tensor=tensor)
        return tensor_group_spread_warning(layout, {"LOCAL_WORLD_SIZE": str(per_node)})

    # 2 nodes x 3 processes with TP2: the group (2, 3) holds one rank of each node.
    assert "parallel.tensor=2 does not divide the 3 processes per node" in warning(6, 3, 2)
    assert "GPUS_PER_NODE" in warning(4, 1, 2)
    assert warning(8, 4, 2) is None and warning(4, 4, 4) is None  # whole groups per node / one node
    assert "parallel.tensor=4 does not divide the 2 processes" in warning(4, 2, 4)  # a group larger than a node
    assert warning(4, 1, 1) is None  # no tensor parallelism
    assert tensor_group_spread_warning(ParallelLayout(world_size=2, rank=0, local_rank=0, tensor=2), {}) is None
