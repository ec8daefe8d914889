"""The per-layer step (run_block) and the crossing set: what a pipeline stage needs from the one before.

Chaining run_block over stage ranges, handing only the hidden state and the K/V bank across each
boundary, must equal the dense forward; the bank at a boundary must be exactly crossing(plan, c), and
crossing must equal a brute-force count over readers. Partial builds start from the dense weights.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from megakv.config import ModelConfig
from megakv.model import Block, MegaKVModel, init_weights, run_block
from megakv.routing import RoutingPlan, crossing, sample_plan

CFG = ModelConfig(vocab_size=53, d_model=32, n_layers=7, n_heads=4, n_kv_heads=2, ffn_hidden=48, max_seq_len=16,
                  qk_norm=True, family="qwen3")


def brute_force_crossing(sources: tuple[int, ...], boundary: int) -> tuple[int, ...]:
    readers_after = [src for layer, src in enumerate(sources) if layer >= boundary and src < boundary]
    return tuple(sorted(set(readers_after)))


def random_plans(n_layers: int, count: int, seed: int) -> list[RoutingPlan]:
    rng = random.Random(seed)
    plans = [RoutingPlan.own(n_layers), RoutingPlan(tuple([0] * n_layers))]  # no routing; all read layer 0
    for _ in range(count):
        plans.append(RoutingPlan(tuple(rng.randint(0, layer) if rng.random() < 0.6 else layer
                                       for layer in range(n_layers))))
    return plans


def test_crossing_equals_brute_force_on_every_plan_of_five_layers():
    all_sources = itertools.product(*[range(layer + 1) for layer in range(5)])
    for sources in all_sources:
        plan = RoutingPlan(tuple(sources))
        for boundary in range(6):
            assert crossing(plan, boundary) == brute_force_crossing(plan.sources, boundary), (sources, boundary)


def test_crossing_on_sampled_deep_plans_and_bounds():
    for step in range(50):
        plan = sample_plan("rcla", 28, q_cross=0.5, seed=3, step=step)
        for boundary in (0, 7, 14, 21, 28):
            assert crossing(plan, boundary) == brute_force_crossing(plan.sources, boundary)
    assert crossing(RoutingPlan((0, 0, 1, 0)), 2) == (0, 1)
    assert crossing(RoutingPlan.own(4), 2) == ()
    with pytest.raises(ValueError, match="boundary 5"):
        crossing(RoutingPlan.own(4), 5)


@pytest.fixture(scope="module")
def model():
    m = MegaKVModel(CFG, init_seed=11).eval()
    with torch.no_grad():  # non-trivial norm weights so a skipped norm would show
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    return m


def staged_forward(model: MegaKVModel, ids: torch.Tensor, plan: RoutingPlan, cuts: list[int]) -> torch.Tensor:
    """Stages [cuts[s], cuts[s+1]) chained with run_block; only hidden + the K/V bank cross a boundary."""
    x = model.embed(ids)
    rope = model.rope(model.default_positions(ids), x.dtype)
    live: dict = {}
    for start, stop in zip(cuts[:-1], cuts[1:]):
        assert tuple(sorted(live)) == crossing(plan, start)
        # A new stage gets fresh tensors (as if received), not the sender's graph objects.
        x = x.clone()
        live = {j: (k.clone(), v.clone()) for j, (k, v) in live.items()}
        for index in range(start, stop):
            x = run_block(model.layers[index], index, x, rope, plan, live)
    assert live == {}
    return model.head(x)


@pytest.mark.parametrize("cuts", [[0, 7], [0, 3, 7], [0, 1, 4, 7], [0, 2, 4, 6, 7]])
def test_chained_stages_equal_the_dense_forward(model, cuts):
    ids = torch.randint(0, CFG.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    for plan in random_plans(CFG.n_layers, 12, seed=len(cuts)):
        dense = model(ids, plan)
        staged = staged_forward(model, ids, plan, cuts)
        assert torch.allclose(staged, dense, atol=1e-6, rtol=0), (plan, (staged - dense).abs().max())


def test_run_block_bank_invariant_and_gradients_reach_the_source_layer(model):
    plan = RoutingPlan((0, 1, 0, 3, 1, 5, 0))  # layer 2 reads layer 0, layer 4 reads 1, layer 6 reads 0
    ids = torch.randint(0, CFG.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    model.zero_grad()
    x = model.embed(ids)
    rope = model.rope(model.default_positions(ids), x.dtype)
    live: dict = {}
    for index in range(CFG.n_layers):
        assert tuple(sorted(live)) == crossing(plan, index)
        x = run_block(model.layers[index], index, x, rope, plan, live)
    model.head(x).sum().backward()
    # layer 4 reads layer 1's K/V: layer 1's own k_proj must get a gradient from it (layer 1 also reads itself)
    assert model.layers[1].attn.k_proj.weight.grad.abs().sum() > 0
    # layer 2 reads layer 0 and projects no K/V of its own (nobody reads them)
    assert model.layers[2].attn.k_proj.weight.grad is None


def test_partial_builds_start_from_the_dense_weights():
    dense = MegaKVModel(CFG, init_seed=5)
    block = Block(CFG)
    init_weights(block, "layers.4", CFG, seed=5)
    for name, tensor in block.state_dict().items():
        assert torch.equal(tensor, dense.state_dict()[f"layers.4.{name}"]), name
    embed = torch.nn.Embedding(CFG.vocab_size, CFG.d_model)
    init_weights(embed, "embed", CFG, seed=5)
    assert torch.equal(embed.weight, dense.embed.weight)
    other = MegaKVModel(CFG, init_seed=6)
    assert not torch.equal(other.layers[4].attn.q_proj.weight, dense.layers[4].attn.q_proj.weight)
    torch.manual_seed(3)
    first = MegaKVModel(CFG)
    torch.manual_seed(3)
    assert torch.equal(first.embed.weight, MegaKVModel(CFG).embed.weight)  # torch.manual_seed still decides


def test_kept_kv_changes_nothing_but_gives_the_projections_a_zero_gradient(model):
    plan = RoutingPlan((0, 0, 0, 3, 4, 5, 6))  # layers 1, 2 read layer 0; their own K/V are never read
    ids = torch.randint(0, CFG.vocab_size, (1, 8), generator=torch.Generator().manual_seed(4))
    model.zero_grad(set_to_none=True)
    plain = model(ids, plan)
    plain.sum().backward()
    assert model.layers[1].attn.k_proj.weight.grad is None  # skipped: no gradient at all
    model.zero_grad(set_to_none=True)
    kept = model(ids, plan, keep_kv=frozenset({1}))
    assert torch.equal(kept, plain)
    kept.sum().backward()
    assert torch.count_nonzero(model.layers[1].attn.k_proj.weight.grad) == 0  # exactly zero, but present
    assert model.layers[2].attn.k_proj.weight.grad is None
    model.zero_grad(set_to_none=True)
