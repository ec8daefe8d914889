"""The R-CLA decoder under routing plans: hand-computed attention, gradient flow, skipped projections."""

from __future__ import annotations

import math

import pytest
import torch

from megakv.config import ModelConfig
from megakv.model import MegaKVModel, apply_rope
from megakv.routing import RoutingPlan, deployment_plan, sample_plan

CFG = ModelConfig(vocab_size=61, d_model=48, n_layers=5, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32,
                  qk_norm=True, family="qwen3")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = MegaKVModel(CFG).eval()
    with torch.no_grad():  # non-trivial norm weights so a skipped k_norm would show
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.2 * torch.randn_like(p))
    return m


def ids(batch=2, seq=13, seed=0):
    return torch.randint(0, CFG.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def capture_layer_io(model):
    inputs, outputs, handles = {}, {}, []

    def record(index):
        def hook(module, args, out):
            inputs[index], outputs[index] = args[0], out[0]  # returns None: the output is left unchanged
        return hook

    for i, layer in enumerate(model.layers):
        handles.append(layer.register_forward_hook(record(i)))
    return inputs, outputs, handles


def attention_by_hand(layer, x, source_layer, source_x, rope):
    """Layer `layer` with its own queries attending to `source_layer`'s K/V, written out explicitly."""
    a = layer.attn
    h = layer.attn_norm(x)
    hs = source_layer.attn_norm(source_x)
    batch, seq, _ = x.shape
    q = a.q_norm(a.q_proj(h).view(batch, seq, a.n_heads, a.head_dim)).transpose(1, 2)
    sa = source_layer.attn
    k = sa.k_norm(sa.k_proj(hs).view(batch, seq, sa.n_kv_heads, sa.head_dim)).transpose(1, 2)
    v = sa.v_proj(hs).view(batch, seq, sa.n_kv_heads, sa.head_dim).transpose(1, 2)
    q, k = apply_rope(q, rope), apply_rope(k, rope)
    group = a.n_heads // a.n_kv_heads
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(a.head_dim)
    scores = scores.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, -1)
    x = x + a.o_proj(out)
    return x + layer.mlp(layer.mlp_norm(x))


def test_routed_layer_equals_attention_by_hand(model):
    plan = RoutingPlan((0, 1, 0, 1, 3))
    inputs, outputs, handles = capture_layer_io(model)
    x = ids()
    with torch.no_grad():
        model(x, plan)
        rope = model.rope(model.default_positions(x), torch.float32)
        for layer, source in enumerate(plan.sources):
            expected = attention_by_hand(model.layers[layer], inputs[layer], model.layers[source], inputs[source], rope)
            assert (outputs[layer] - expected).abs().max().item() < 1e-5, layer
    for h in handles:
        h.remove()


def test_all_own_plan_is_the_default_and_differs_from_a_routed_plan(model):
    x = ids()
    with torch.no_grad():
        own = model(x)
        assert torch.equal(own, model(x, RoutingPlan.own(CFG.n_layers)))
        assert torch.equal(own, model(x, sample_plan("rcla", CFG.n_layers, q_cross=0.0, seed=0, step=0)))
        assert (own - model(x, deployment_plan("every:2", CFG.n_layers))).abs().max() > 1e-3


def count_kv_projection_calls(model):
    calls = [0] * len(model.layers)
    handles = []
    for i, layer in enumerate(model.layers):
        for proj in (layer.attn.k_proj, layer.attn.v_proj):
            handles.append(proj.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1)))
    return calls, handles


def test_layers_nobody_reads_skip_their_kv_projections(model):
    plan = RoutingPlan((0, 0, 1, 0, 3))  # layer 1 is routed but read by layer 2; layer 2 is read by nobody
    calls, handles = count_kv_projection_calls(model)
    with torch.no_grad():
        model(ids(), plan)
    assert calls == [2, 2, 0, 2, 0]  # k_proj + v_proj once each for the layers whose K/V is read
    for h in handles:
        h.remove()


def test_gradients_flow_to_the_source_layers_kv_projections(model):
    plan = RoutingPlan((0, 0, 1, 0, 3))
    model.zero_grad(set_to_none=True)
    logits = model(ids(), plan)
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids(seed=1).flatten()).backward()
    kv_grad = [(layer.attn.k_proj.weight.grad, layer.attn.v_proj.weight.grad) for layer in model.layers]
    for i in (2, 4):  # attended with other layers' K/V and nobody read theirs: no gradient at all
        assert kv_grad[i] == (None, None)
    for i in (0, 1, 3):
        assert all(g is not None and g.abs().sum() > 0 for g in kv_grad[i]), i
    # Every layer's queries are its own and receive gradient.
    assert all(layer.attn.q_proj.weight.grad.abs().sum() > 0 for layer in model.layers)
    model.zero_grad(set_to_none=True)


def test_gradient_from_a_routed_layer_reaches_its_source():
    torch.manual_seed(1)
    m = MegaKVModel(CFG)
    x = ids()
    # Only layer 3 routes (to layer 1). Layer 1's K/V gradient must then include layer 3's contribution.
    routed, own = RoutingPlan((0, 1, 2, 1, 4)), RoutingPlan.own(CFG.n_layers)

    def grad_of_layer1_k(plan):
        m.zero_grad(set_to_none=True)
        hidden = {}
        h = m.layers[3].register_forward_hook(lambda mod, a, out: hidden.update(y=out[0]))
        m(x, plan)
        h.remove()
        hidden["y"].sum().backward()  # gradient of layer 3's output alone
        return m.layers[1].attn.k_proj.weight.grad

    g_routed = grad_of_layer1_k(routed)
    g_own = grad_of_layer1_k(own)
    assert g_routed is not None and g_own is not None
    # Through the residual stream layer 3 depends on layer 1's K/V in both plans; routed adds a direct path.
    assert (g_routed - g_own).abs().max() > 1e-6
    m.zero_grad(set_to_none=True)
    m(x, routed)[..., 0].sum().backward()
    assert m.layers[3].attn.k_proj.weight.grad is None


def test_plan_layer_count_must_match(model):
    with pytest.raises(ValueError, match="routing plan has 3 layers, the model has 5"):
        model(ids(), RoutingPlan.own(3))


def test_tied_embeddings_share_the_output_weight():
    m = MegaKVModel(ModelConfig(vocab_size=50, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=48,
                                tie_embeddings=True))
    assert m.lm_head is None and m.output_weight() is m.embed.weight
    assert "lm_head.weight" not in m.state_dict()
