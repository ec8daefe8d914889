"""The inference engine: cached decode equals the full forward pass, exact cache size, skipped K/V
projections, padding-independent batching, sampling, and clear errors for bad retention plans."""

from __future__ import annotations

import pytest
import torch
from test_inference_support import EOS_ID, PAD_ID, VOCAB, tiny_model

from megakv.inference.cache import RetainedKVCache, kv_bytes_per_token
from megakv.inference.engine import InferenceEngine
from megakv.inference.sampling import SamplingConfig, filter_logits, sample_next_token
from megakv.routing import deployment_plan

PLANS = ["all", "every:2", "every:3", "every:4", "0,1,5", "0,4", "0"]


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
@pytest.mark.parametrize("retain", PLANS)
def test_incremental_decode_equals_full_forward(retain, qk_norm):
    model = tiny_model(seed=1, qk_norm=qk_norm, family="qwen3" if qk_norm else "llama")
    ids = torch.randint(0, VOCAB, (2, 21), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, plan=deployment_plan(retain, 6))
    engine = InferenceEngine(model, retain)
    cache = engine.new_cache(batch=2, max_len=21)
    positions = model.default_positions(ids)
    # Prefill 8 tokens, then one token at a time, with one 3-token chunk in between.
    chunks = [(0, 8)] + [(t, t + 1) for t in range(8, 12)] + [(12, 15)] + [(t, t + 1) for t in range(15, 21)]
    got = torch.cat([engine.step(ids[:, a:b], cache, positions[:, a:b], last_only=False) for a, b in chunks], 1)
    assert cache.length == 21
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("retain", PLANS)
def test_cache_allocation_is_exact(model, retain, dtype):
    cfg = model.cfg
    retained = deployment_plan(retain, cfg.n_layers).retained
    cache = RetainedKVCache(cfg, retained, batch=3, max_len=17, dtype=dtype)
    element = torch.empty((), dtype=dtype).element_size()
    per_token = 2 * len(retained) * cfg.n_kv_heads * cfg.resolved_head_dim * element
    assert cache.bytes_per_token == per_token == kv_bytes_per_token(cfg, len(retained), dtype)
    assert cache.nbytes == per_token * 3 * 17
    assert sorted(cache.buffers) == list(retained)  # one buffer per retained layer, none for the others
    for layer in range(cfg.n_layers):
        assert cache.holds(layer) == (layer in retained)
    outside = [layer for layer in range(cfg.n_layers) if layer not in retained]
    if outside:
        kv = torch.zeros(3, cfg.n_kv_heads, 1, cfg.resolved_head_dim, dtype=dtype)
        with pytest.raises(KeyError, match="not retained"):
            cache.extend(outside[0], (kv, kv))


def test_generation_reports_exact_cache_bytes(model):
    out = InferenceEngine(model, "every:2").generate([[5, 6, 7], [8, 9]], max_new_tokens=4)
    s = out.stats
    assert s.retained == (0, 2, 4)
    assert s.cache_bytes_per_token == 2 * 3 * 2 * 16 * 4
    assert s.cache_bytes == s.cache_bytes_per_token * 2 * (3 + 4 - 1)  # the last new token is never run
    assert s.new_tokens == 4 and s.ttft_s > 0


@pytest.mark.parametrize("retain", ["every:2", "0,3", "all"])
def test_non_retained_layers_never_run_kv_projections(model, retain):
    calls = {}
    handles = []
    for index, layer in enumerate(model.layers):
        for name in ("k_proj", "v_proj"):
            module = getattr(layer.attn, name)
            calls[index, name] = 0

            def hook(_module, _inputs, _output, key=(index, name)):
                calls[key] += 1

            handles.append(module.register_forward_hook(hook))
    try:
        InferenceEngine(model, retain).generate([[5, 6, 7, 8], [9, 10]], max_new_tokens=5)
    finally:
        for handle in handles:
            handle.remove()
    retained = deployment_plan(retain, 6).retained
    for (layer, name), count in calls.items():
        if layer in retained:
            assert count == 5, (layer, name)  # prefill + 4 decode steps
        else:
            assert count == 0, (layer, name)


@pytest.mark.parametrize("retain", ["all", "every:2", "0,1,5"])
def test_batched_generation_with_padding_equals_one_by_one(model, retain):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15], [16, 17, 18, 19, 20]]
    engine = InferenceEngine(model, retain)
    batched = engine.generate(prompts, max_new_tokens=10, pad_id=PAD_ID)
    for row, prompt in enumerate(prompts):
        alone = engine.generate([prompt], max_new_tokens=10)
        assert batched.tokens[row] == alone.tokens[0]
        assert (batched.first_logits[row] - alone.first_logits[0]).abs().max().item() <= 1e-5


def test_generation_stops_at_eos_per_sequence(model):
    engine = InferenceEngine(model, "every:2")
    reference = engine.generate([[5, 6, 7], [30, 31]], max_new_tokens=12)
    # Pretend the 3rd token of the first sequence is the end-of-sequence token.
    stop = reference.tokens[0][2]
    out = engine.generate([[5, 6, 7], [30, 31]], max_new_tokens=12, eos_id=stop)
    assert out.tokens[0] == reference.tokens[0][: reference.tokens[0].index(stop) + 1]
    assert out.finish_reasons[0] == "eos"
    other = reference.tokens[1]
    expected_other = other[: other.index(stop) + 1] if stop in other else other
    assert out.tokens[1] == expected_other


def test_sampling_modes():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [0.0, 3.0, 2.9, 1.0]])
    assert sample_next_token(logits, SamplingConfig()).tolist() == [0, 1]
    top1 = SamplingConfig(temperature=1.0, top_k=1, seed=0)
    assert sample_next_token(logits, top1, top1.generator()).tolist() == [0, 1]
    tiny_p = SamplingConfig(temperature=1.0, top_p=1e-6, seed=0)
    assert sample_next_token(logits, tiny_p, tiny_p.generator()).tolist() == [0, 1]
    kept = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isinf(kept).sum().item() == 4
    nucleus = filter_logits(torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])), top_k=0, top_p=0.7)
    assert torch.isfinite(nucleus).tolist() == [[True, True, False, False]]
    hot = SamplingConfig(temperature=5.0, seed=3)
    draws = [sample_next_token(logits, hot, hot.generator()).tolist() for _ in range(2)]
    assert draws[0] == draws[1]  # same seed, same tokens
    for bad in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
        with pytest.raises(ValueError):
            SamplingConfig(**bad)


def test_seeded_sampling_generation_is_reproducible(model):
    engine = InferenceEngine(model, "every:3")
    sampling = SamplingConfig(temperature=1.0, top_k=10, top_p=0.9, seed=7)
    first = engine.generate([[5, 6], [7, 8, 9]], max_new_tokens=8, sampling=sampling, eos_id=EOS_ID)
    second = engine.generate([[5, 6], [7, 8, 9]], max_new_tokens=8, sampling=sampling, eos_id=EOS_ID)
    assert first.tokens == second.tokens


@pytest.mark.parametrize("retain,message", [
    ("1,3", "must include layer 0"),
    ([0, 2, 6], r"out of range .*valid: 0\.\.5"),
    ("0,-1", "out of range"),
    ("every:0", "K must be >= 1"),
    ("half", "expected every:K, all, or a list"),
])
def test_bad_retention_plans_are_refused_clearly(model, retain, message):
    with pytest.raises(ValueError, match=message):
        InferenceEngine(model, retain)


def test_cache_overflow_and_bad_prompts_are_refused(model):
    engine = InferenceEngine(model, "all")
    cache = engine.new_cache(batch=1, max_len=4)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with pytest.raises(ValueError, match="allocate a larger cache"):
        engine.step(ids, cache, model.default_positions(ids))
    with pytest.raises(ValueError, match="at least one token"):
        engine.generate([[5], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate([[5]], max_new_tokens=0)


@pytest.mark.parametrize("retain", ["all", "every:2", "0,1,5"])
def test_padded_decode_logits_equal_each_prompt_alone(model, retain):
    """Every decode step of a left-padded batch (GQA folded into the query axis, the padding mask a view of
    the key validity) gives each row the logits of its prompt's own full forward."""
    from megakv.inference.padding import left_pad, positions_from_valid

    rows = [[5, 6, 7, 8, 9, 10], [12, 13], [15, 16, 17, 18]]
    continuation = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(2))
    engine, plan = InferenceEngine(model, retain), deployment_plan(retain, 6)
    ids, valid = left_pad(rows, PAD_ID)
    cache = engine.new_cache(3, ids.shape[1] + 5)
    engine.step(ids, cache, positions_from_valid(valid), valid)
    next_position = positions_from_valid(valid)[:, -1] + 1
    for t in range(5):
        key_valid = torch.cat([valid, torch.ones(3, t + 1, dtype=torch.bool)], 1)
        got = engine.step(continuation[:, t:t + 1], cache, (next_position + t)[:, None], key_valid)[:, -1]
        for row, prompt in enumerate(rows):
            alone = torch.tensor([prompt + continuation[row, :t + 1].tolist()])
            with torch.no_grad():
                expected = model(alone, plan=plan)[0, -1]
            assert (got[row] - expected).abs().max().item() <= 1e-5


def test_an_engine_follows_parameters_replaced_after_it_was_built():
    """load_state_dict(..., assign=True) puts new Parameter objects into the served model: an engine built before
    decodes with them, prepacked or not (the packed copies once kept the old weights: other tokens, silently)."""
    from megakv.inference.prepacked import MIN_PACKED_OUT, prepacking_available

    ids = torch.randint(0, MIN_PACKED_OUT, (4, 10), generator=torch.Generator().manual_seed(7))
    replacement = tiny_model(seed=8, ffn_hidden=MIN_PACKED_OUT, vocab_size=MIN_PACKED_OUT).state_dict()
    for prepack in (True, False):
        model = tiny_model(seed=4, ffn_hidden=MIN_PACKED_OUT, vocab_size=MIN_PACKED_OUT)
        if prepack and not prepacking_available(model.embed.weight):
            pytest.skip("this torch build has no oneDNN (prepacking is a CPU fp32 optimisation)")
        engine = InferenceEngine(model, "every:2", prepack=prepack)
        positions = model.default_positions(ids)
        warm = engine.new_cache(4, 10)  # packs the weights it has now
        engine.step(ids[:, :5], warm, positions[:, :5])
        engine.step(ids[:, 5:6], warm, positions[:, 5:6])
        model.load_state_dict(replacement, assign=True)
        cache = engine.new_cache(4, 10)
        engine.step(ids[:, :5], cache, positions[:, :5])
        got = torch.cat([engine.step(ids[:, t:t + 1], cache, positions[:, t:t + 1]) for t in range(5, 10)], 1)
        with torch.no_grad():
            expected = model(ids, plan=deployment_plan("every:2", model.cfg.n_layers))[:, 5:]
        assert (got - expected).abs().max().item() <= 1e-5, prepack


def test_prepacked_decode_matmuls_equal_f_linear_and_follow_weight_writes():
    """Decode-sized matmuls (2-64 rows) of wide weights run on oneDNN-prepacked weights: the same numbers as
    F.linear, the original's parameters and hooks shared, a weight written in place repacked before its next
    use; narrow weights stay plain; decode equals the full forward with and without prepacking."""
    import torch.nn.functional as F

    from megakv.inference.decode_view import decode_view
    from megakv.inference.prepacked import MAX_PACKED_ROWS, MIN_PACKED_OUT, PackedLinear, prepacking_available

    model = tiny_model(seed=4, ffn_hidden=MIN_PACKED_OUT, vocab_size=MIN_PACKED_OUT)  # gate/up/head wide enough
    if not prepacking_available(model.embed.weight):
        pytest.skip("this torch build has no oneDNN (prepacking is a CPU fp32 optimisation)")
    view = decode_view(model)
    original, packed = model.layers[1].mlp.up_proj, view.layers[1].mlp.up_proj
    assert type(packed) is PackedLinear and type(original) is torch.nn.Linear
    assert type(view.layers[1].attn.k_proj) is torch.nn.Linear  # 32 outputs: MKL is faster there
    assert view.layers[1].attn.k_proj is not model.layers[1].attn.k_proj  # a shallow copy, sharing weights
    assert packed.weight is original.weight and packed._forward_hooks is original._forward_hooks
    for rows in (1, 2, 8, MAX_PACKED_ROWS, MAX_PACKED_ROWS + 1):
        x = torch.randn(rows, model.cfg.d_model, generator=torch.Generator().manual_seed(rows))
        with torch.no_grad():
            assert (packed(x) - F.linear(x, original.weight)).abs().max().item() <= 1e-5
    with torch.no_grad():
        original.weight.mul_(-2.0)  # an in-place write (e.g. load_state_dict into the served model)
        x = torch.randn(8, model.cfg.d_model)
        assert (packed(x) - F.linear(x, original.weight)).abs().max().item() <= 1e-5
        original.weight.data = torch.randn_like(original.weight)  # new storage, version counter reset
        assert (packed(x) - F.linear(x, original.weight)).abs().max().item() <= 1e-5

    ids = torch.randint(0, MIN_PACKED_OUT, (8, 12), generator=torch.Generator().manual_seed(5))
    positions = model.default_positions(ids)
    logits = {}
    for prepack in (True, False):
        engine = InferenceEngine(model, "every:2", prepack=prepack, native_attention=False)
        assert (engine._runner is not model) == prepack and (engine._output_weight is not None) == prepack
        with_kernel = InferenceEngine(model, "every:2", prepack=prepack)  # a view for the attention alone
        assert (with_kernel._output_weight is not None) == prepack
        assert any(type(m) is PackedLinear for m in with_kernel._runner.modules()) == prepack
        cache = engine.new_cache(8, 12)
        engine.step(ids[:, :6], cache, positions[:, :6])
        logits[prepack] = torch.cat([engine.step(ids[:, t:t + 1], cache, positions[:, t:t + 1])
                                     for t in range(6, 12)], 1)
    with torch.no_grad():
        expected = model(ids, plan=deployment_plan("every:2", 6))[:, 6:]
    for got in logits.values():
        assert (got - expected).abs().max().item() <= 1e-5
