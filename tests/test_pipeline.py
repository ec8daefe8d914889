"""Pipeline pieces without process groups: stage cuts, packing across a boundary, names, bytes, refusals.

The stage chain itself (BlockPipe by BlockPipe, packing at the cuts) is compared with the dense forward
here, in one process, so a packing mistake shows without DeepSpeed; training under the real pipe engine
is tests/test_pipeline_train.py.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from train_data import prepare_tiny_dataset
from train_helpers import TINY_RECIPE

from megakv.config import ConfigError, ModelConfig, load_config
from megakv.model import MegaKVModel
from megakv.parallel.layout import ParallelLayout
from megakv.parallel.partition import balanced_cuts, block_cuts, stage_weights
from megakv.parallel.pipeline import (
    BlockPipe,
    EmbedPipe,
    HeadPipe,
    NormPipe,
    boundary_bytes,
    dense_name,
    max_slots,
    pack,
    plan_of,
    plan_tensor,
    spec_parts,
    tied_head,
    unpack,
)
from megakv.routing import RoutingPlan, crossing, sample_plan
from megakv.train.preflight import preflight

CFG = ModelConfig(vocab_size=53, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=16,
                  qk_norm=True, family="qwen3")
SEED = 17


def expect_error(field: str, fn, *args):
    with pytest.raises(ConfigError) as info:
        fn(*args)
    assert info.value.field == field, str(info.value)
    assert "Fix:" in str(info.value)
    return info.value


def test_block_cuts_uniform_and_by_parameters():
    assert block_cuts(CFG, 2, "uniform") == [0, 3, 6]
    assert block_cuts(CFG, 3, "uniform") == [0, 2, 4, 6]
    assert block_cuts(CFG, 6, "uniform") == list(range(7))
    cuts = block_cuts(CFG, 4, "parameters")
    weights = stage_weights(CFG)
    heaviest = max(sum(weights[a:b]) for a, b in zip(cuts[:-1], cuts[1:]))
    # exact optimum: no contiguous cut into 4 non-empty parts has a lighter heaviest stage
    import itertools
    best = min(max(sum(weights[a:b]) for a, b in zip((0, *c), (*c, 6)))
               for c in itertools.combinations(range(1, 6), 3))
    assert heaviest == best and cuts[0] == 0 and cuts[-1] == 6 and all(a < b for a, b in zip(cuts, cuts[1:]))
    assert balanced_cuts([5, 1, 1, 1, 1, 5], 2) == [0, 3, 6]
    assert spec_parts([0, 3, 6]) == [0, 4, 9]  # embed + blocks 0-2 | blocks 3-5 + norm + head


def test_bad_stage_cuts_are_refused_with_the_field_and_a_fix():
    err = expect_error("parallel.pipeline", block_cuts, CFG, 4, "uniform")
    assert "do not divide" in err.problem and "parameters" in err.fix
    err = expect_error("parallel.pipeline", block_cuts, CFG, 7, "parameters")
    assert "more pipeline stages than transformer blocks" in err.problem
    expect_error("parallel.pipeline_partition", block_cuts, CFG, 2, "profile")


def test_pack_unpack_round_trip_and_gradient_reaches_every_slice():
    batch, seq = 2, 5
    hidden = torch.randn(batch, seq, CFG.d_model, requires_grad=True)
    width = CFG.n_kv_heads * CFG.resolved_head_dim
    live = {j: (torch.randn(batch, CFG.n_kv_heads, seq, CFG.resolved_head_dim, requires_grad=True),
                torch.randn(batch, CFG.n_kv_heads, seq, CFG.resolved_head_dim, requires_grad=True)) for j in (0, 2)}
    packed = pack(hidden, live, (0, 2), slots=3, width=width)
    assert packed.shape == (batch, seq, CFG.d_model + 2 * 3 * width)
    assert torch.equal(packed[..., CFG.d_model + 4 * width:], torch.zeros(batch, seq, 2 * width))  # padding
    back, kv = unpack(packed, (0, 2), CFG)
    assert torch.equal(back, hidden) and sorted(kv) == [0, 2]
    assert all(torch.equal(kv[j][i], live[j][i]) for j in (0, 2) for i in (0, 1))
    (back.sum() + sum(t.sum() for pair in kv.values() for t in pair)).backward()
    assert hidden.grad is not None and all(t.grad is not None for pair in live.values() for t in pair)


def stage_chain(cfg: ModelConfig, cuts: list[int], transport: str, ids: torch.Tensor, plan: RoutingPlan):
    """The pipeline's layers built one by one and run in order, as the stages would (one process)."""
    starts = tuple(cuts[1:-1])
    embed = EmbedPipe(cfg, SEED)
    blocks = [BlockPipe(cfg, i, SEED, starts, transport, None) for i in range(cfg.n_layers)]
    x = embed((ids, plan_tensor(plan)))
    shapes = []
    for i, block in enumerate(blocks):
        x = block(x)
        if i + 1 in starts:
            assert len(x) == 2 and x[1].dtype == torch.long  # (packed, plan) across the boundary
            shapes.append(tuple(x[0].shape))
            x = (x[0].detach().clone().requires_grad_(True), x[1])  # as the next stage receives it
    hidden = NormPipe(cfg)(x)
    logits = tied_head(embed, hidden) if cfg.tie_embeddings else HeadPipe(cfg, SEED)(hidden)
    return logits, shapes


@pytest.mark.parametrize("transport", ["fixed", "dynamic"])
def test_stage_chain_equals_the_dense_model(transport):
    dense = MegaKVModel(CFG, init_seed=SEED).eval()
    ids = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    cuts = [0, 2, 3, 6]
    plans = [RoutingPlan.own(6), RoutingPlan((0,) * 6), RoutingPlan((0, 1, 0, 0, 1, 2)),
             *(sample_plan("rcla", 6, q_cross=0.7, seed=1, step=s) for s in range(6))]
    for plan in plans:
        logits, shapes = stage_chain(CFG, cuts, transport, ids, plan)
        assert torch.allclose(logits, dense(ids, plan), atol=1e-6, rtol=0), plan
        width = CFG.n_kv_heads * CFG.resolved_head_dim
        for c, shape in zip(cuts[1:-1], shapes):
            slots = len(crossing(plan, c)) if transport == "dynamic" else max_slots(6, c, None)
            assert shape[-1] == CFG.d_model + 2 * slots * width


def test_tied_stage_chain_equals_the_dense_model():
    cfg = ModelConfig(**{**CFG.__dict__, "tie_embeddings": True})
    dense = MegaKVModel(cfg, init_seed=SEED).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(1))
    plan = RoutingPlan((0, 0, 1, 0, 2, 3))
    logits, _ = stage_chain(cfg, [0, 3, 6], "fixed", ids, plan)
    assert torch.allclose(logits, dense(ids, plan), atol=1e-6, rtol=0)


def test_pipeline_names_map_to_the_dense_model():
    n = CFG.n_layers
    assert dense_name("0.embed.weight", n) == "embed.weight"
    assert dense_name("tied_modules.embed.embed.weight", n) == "embed.weight"
    assert dense_name("3.block.attn.q_proj.weight", n) == "layers.2.attn.q_proj.weight"
    assert dense_name(f"{n + 1}.norm.weight", n) == "norm.weight"
    assert dense_name(f"{n + 2}.lm_head.weight", n) == "lm_head.weight"
    dense_keys = set(MegaKVModel(CFG, init_seed=0).state_dict())
    mapped = {dense_name(f"{i + 1}.{k}", n) for i in range(n)
              for k in BlockPipe(CFG, i, 0, (), "fixed", None).state_dict()}
    mapped |= {"embed.weight", "norm.weight", "lm_head.weight"}
    assert mapped == dense_keys - {k for k in dense_keys if k.startswith("rope.")}


def test_boundary_bytes_follow_the_crossing_set():
    plan = RoutingPlan((0, 0, 1, 0, 2, 5))
    got = boundary_bytes(CFG, plan, 3, tokens=100, element_size=2)
    hidden = 100 * CFG.d_model * 2
    per = 2 * 100 * CFG.n_kv_heads * CFG.resolved_head_dim * 2
    assert got == {"hidden_only": hidden, "megakv": hidden + 2 * per, "all_earlier": hidden + 3 * per}
    assert max_slots(28, 7, None) == 7 and max_slots(28, 21, None) == 7 and max_slots(28, 14, 4) == 4


def test_each_rank_gets_its_global_slots_and_keeps_what_any_replica_reads():
    from megakv.parallel.runners import kept_kv, rank_plans

    step = [RoutingPlan((0, 1, 2, 3)), RoutingPlan((0, 0, 0, 0)), RoutingPlan((0, 0, 2, 2)), RoutingPlan((0, 1, 1, 3))]
    assert rank_plans(step, 0, 2) == step[:2] and rank_plans(step, 1, 2) == step[2:]
    assert rank_plans(step[:1], 1, 2) == step[:1]  # one plan per step: everybody's
    # local micro-batch 0: replicas run slots 0 and 2 -> K/V read: {0,1,2,3} | {0,2}
    assert kept_kv(step, 2) == [frozenset({0, 1, 2, 3}), frozenset({0, 1, 3})]
    assert kept_kv(step, 1) == [frozenset()] and kept_kv(step[:1], 2) == [frozenset()]
    assert kept_kv(step, 2, every_layer=True) == kept_kv(step[:1], 1, every_layer=True) == [frozenset(range(4))]
    tensor = plan_tensor(step[1], frozenset({1, 3}))
    assert tensor.tolist() == [[0, 0, 0, 0], [0, 1, 0, 1]]
    assert plan_of(tensor) == (step[1], frozenset({1, 3}))
    assert plan_of(tensor) is plan_of(tensor)  # parsed once: each block of a stage reads the same tensor
    assert plan_of(plan_tensor(step[3])) == (step[3], frozenset())


def test_dense_activation_checkpointing_gives_the_same_gradients():
    from megakv.parallel.wrap import recompute_blocks

    ids = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    plan = RoutingPlan((0, 0, 1, 0, 3, 2))
    grads = []
    for recompute in (False, True):
        model = MegaKVModel(CFG, init_seed=SEED)
        if recompute:
            recompute_blocks(model)
        # Each block's MLP runs once in the forward, and again in the backward only when it is recomputed (a
        # pre-hook: non-reentrant checkpointing stops a recompute once it has the saved tensors it needs).
        calls = [0] * CFG.n_layers
        for index, block in enumerate(model.layers):
            block.mlp.register_forward_pre_hook(
                lambda *_, index=index, calls=calls: calls.__setitem__(index, calls[index] + 1))
        loss = torch.nn.functional.cross_entropy(model(ids, plan).flatten(0, 1), ids.flatten())
        assert calls == [1] * CFG.n_layers
        loss.backward()
        assert calls == [2 if recompute else 1] * CFG.n_layers
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and "embed.weight" in grads[1]
    assert all(torch.allclose(grads[0][n], grads[1][n], rtol=1e-6, atol=1e-9) for n in grads[0])


# ----------------------------------------------------------------------------- refused before any process group


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_tiny_dataset(tmp_path_factory.mktemp("pipeline_data"))


def tiny(dataset: Path, tmp_path: Path, *overrides: str):
    return load_config(TINY_RECIPE, [f"data.datasets=[{dataset}]", f"train.run_dir={tmp_path / 'run'}",
                                     "parallel.zero_stage=1", *overrides])


def layout(world: int, pipeline: int) -> ParallelLayout:
    return ParallelLayout(world_size=world, rank=0, local_rank=0, pipeline=pipeline)


def test_launches_the_pipeline_cannot_run_are_refused(dataset, tmp_path):
    # tiny: 4 layers, global_batch 8, micro_batch 2
    expect_error("parallel.pipeline", preflight, tiny(dataset, tmp_path, "parallel.pipeline=3"), layout(3, 3))
    err = expect_error("parallel.pipeline", preflight, tiny(dataset, tmp_path, "parallel.pipeline=5"), layout(5, 5))
    assert "n_layers=4" in err.problem
    err = expect_error("parallel.pipeline", preflight, tiny(dataset, tmp_path, "parallel.pipeline=2"), layout(3, 2))
    assert "not a multiple of tensor x pipeline" in err.problem
    expect_error("parallel.zero_stage", preflight,
                 tiny(dataset, tmp_path, "parallel.pipeline=2", "parallel.zero_stage=2"), layout(2, 2))
    ok = preflight(tiny(dataset, tmp_path, "parallel.pipeline=3", "parallel.pipeline_partition=parameters"),
                   layout(3, 3))
    assert ok.ds_config["pipeline"] == {"pipe_partitioned": False, "grad_partitioned": False}
    with pytest.warns(UserWarning, match="pipeline bubble"):
        preflight(tiny(dataset, tmp_path, "parallel.pipeline=4", "train.global_batch=4"), layout(4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        preflight(tiny(dataset, tmp_path, "parallel.pipeline=2"), layout(2, 2))  # 4 micro-batches: no warning
    err = expect_error("routing.per_micro_batch", preflight,
                       tiny(dataset, tmp_path, "parallel.zero_stage=3", "routing.per_micro_batch=true"), layout(2, 1))
    assert "zero_stage=1 or 2" in err.fix
