"""Elastic retention: a live generation moving from retained set S to S' (a subset) between two steps.

The reference is a brute-force recomputation of the definition (megakv/inference/engine.py): each
position p runs under the plan of its own time (S before the switch, S' after), and layer l's query at p
attends to the K/V of layer plan_p[l] at positions 0..p, those K/V being that layer's own projections of
each token's hidden state as it was computed. No cache, no run_block: every layer projects its K/V for
every position, and every query position is attended separately.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from test_inference_support import VOCAB, tiny_model

from megakv.cli.generate import main as generate_main
from megakv.cli.generate import parse_shrink_at
from megakv.inference.engine import InferenceEngine
from megakv.model import MegaKVModel
from megakv.routing import RoutingPlan, deployment_plan


def reference_logits(model: MegaKVModel, ids: torch.Tensor, plan_at: list[RoutingPlan]) -> torch.Tensor:
    """Logits (batch, T, vocab) when position p runs under plan_at[p] (brute force, O(T) attentions/layer)."""
    batch, length = ids.shape
    x = model.embed(ids)
    rope = model.rope(model.default_positions(ids), x.dtype)
    own_kv = {}
    for index, block in enumerate(model.layers):
        h = block.attn_norm(x)
        q = block.attn.project_q(h, rope)
        own_kv[index] = block.attn.project_kv(h, rope)
        rows = []
        for p in range(length):
            k, v = own_kv[plan_at[p][index]]
            rows.append(F.scaled_dot_product_attention(q[:, :, p:p + 1], k[:, :, :p + 1], v[:, :, :p + 1],
                                                       enable_gqa=True))
        attended = torch.cat(rows, 2).transpose(1, 2).reshape(batch, length, -1)
        x = x + block.attn.o_proj(attended)
        x = x + block.mlp(block.mlp_norm(x))
    return model.head(x)


def plans_over_time(n_layers: int, length: int, switches: list[tuple[int, str]], start: str) -> list[RoutingPlan]:
    """plan_at[p]: `start` before the first switch position, then each switch's set from its position on."""
    plan_at, current, pending = [], deployment_plan(start, n_layers), list(switches)
    for p in range(length):
        while pending and pending[0][0] == p:
            current = deployment_plan(pending.pop(0)[1], n_layers)
        plan_at.append(current)
    return plan_at


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
@pytest.mark.parametrize("start,shrunk", [("all", "every:2"), ("every:2", "every:4"), ("all", "0"),
                                          ("0,1,5", "0,5"), ("every:3", "every:3")])
def test_shrink_computes_the_definition(start, shrunk, qk_norm):
    model = tiny_model(seed=1, qk_norm=qk_norm, family="qwen3" if qk_norm else "llama")
    ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    switch = 11
    with torch.no_grad():
        expected = reference_logits(model, ids, plans_over_time(6, 20, [(switch, shrunk)], start))
    engine = InferenceEngine(model, start)
    cache = engine.new_cache(batch=2, max_len=20)
    positions = model.default_positions(ids)
    # Under S: prefill 8, then 3 single steps; switch; under S': 4 single steps, a 3-token chunk, 2 steps.
    before = [(0, 8), (8, 9), (9, 10), (10, 11)]
    after = [(11, 12), (12, 13), (13, 14), (14, 15), (15, 18), (18, 19), (19, 20)]
    got = [engine.step(ids[:, a:b], cache, positions[:, a:b], last_only=False) for a, b in before]
    engine.set_retain(shrunk, cache)
    assert cache.retained == deployment_plan(shrunk, 6).retained and cache.length == switch
    got += [engine.step(ids[:, a:b], cache, positions[:, a:b], last_only=False) for a, b in after]
    assert (torch.cat(got, 1) - expected).abs().max().item() <= 1e-5
    if start != shrunk:  # after the switch it differs from staying at S, and from starting at S' ...
        with torch.no_grad():
            stay, fresh = (reference_logits(model, ids, plans_over_time(6, 20, [], plan)) for plan in (start, shrunk))
        assert (stay[:, switch:] - expected[:, switch:]).abs().max().item() > 1e-3
        fresh_gap = (fresh[:, switch:] - expected[:, switch:]).abs().max().item()
        # ... except for S' = {0}: layer 0's K/V depend on the embeddings alone, whatever the plan was.
        assert fresh_gap <= 1e-5 if shrunk == "0" else fresh_gap > 1e-3


def test_shrink_frees_dropped_buffers_and_recomputes_nothing(model):
    engine = InferenceEngine(model, "all")
    cache = engine.new_cache(batch=3, max_len=16)
    per_layer = 2 * model.cfg.n_kv_heads * model.cfg.resolved_head_dim * 4 * 3 * 16
    assert cache.nbytes == 6 * per_layer
    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(1))
    positions = model.default_positions(ids)
    engine.step(ids[:, :6], cache, positions[:, :6])
    dropped = {layer: weakref.ref(cache.buffers[layer]) for layer in (1, 3, 5)}
    kept = {layer: cache.buffers[layer] for layer in (0, 2, 4)}
    kept_before = {layer: buffer[:, :, :, :6].clone() for layer, buffer in kept.items()}

    calls = dict.fromkeys(range(6), 0)
    handles = [layer.attn.k_proj.register_forward_hook(
        lambda *_args, index=index: calls.__setitem__(index, calls[index] + 1))
        for index, layer in enumerate(model.layers)]
    try:
        engine.set_retain("every:2", cache)
        assert all(ref() is None for ref in dropped.values())  # freed at once
        assert cache.nbytes == 3 * per_layer and cache.bytes_per_token == 3 * per_layer // (3 * 16)
        assert sum(calls.values()) == 0  # the switch itself computes nothing
        for t in range(6, 10):
            engine.step(ids[:, t:t + 1], cache, positions[:, t:t + 1])
    finally:
        for handle in handles:
            handle.remove()
    assert calls == {0: 4, 1: 0, 2: 4, 3: 0, 4: 4, 5: 0}  # only S' projects, only the new positions
    for layer, buffer in kept.items():
        assert cache.buffers[layer] is buffer  # kept in place, not copied
        assert torch.equal(buffer[:, :, :, :6], kept_before[layer])  # the prefix K/V made under S stay


@pytest.mark.parametrize("start,schedule", [("all", [(3, "every:2"), (6, "every:4")]),
                                            ("every:2", [(1, "0,4")]), ("0,1,5", [(5, "0,5"), (7, "0")])])
def test_generate_with_shrinks_equals_brute_force_greedy(model, start, schedule):
    prompt, new = [5, 9, 14, 3, 22, 7], 9
    out = InferenceEngine(model, start).generate([prompt], new, shrink_at=schedule)
    # Token i (1-based) comes from the step whose input is at position len(prompt) + i - 2: the first N
    # tokens are made under the old set, so positions >= len(prompt) + N - 1 run under the new one.
    switches = [(len(prompt) + n - 1, retain) for n, retain in schedule]
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new):
            ids = torch.tensor([tokens])
            logits = reference_logits(model, ids, plans_over_time(6, len(tokens), switches, start))
            tokens.append(int(logits[0, -1].argmax()))
    assert out.tokens[0] == tokens[len(prompt):]
    changes = out.stats.retain_changes
    assert [(c.after_tokens, c.retained) for c in changes] == [
        (n, deployment_plan(r, 6).retained) for n, r in schedule]
    per_layer_bytes = 2 * model.cfg.n_kv_heads * model.cfg.resolved_head_dim * 4 * (len(prompt) + new - 1)
    for change in changes:
        assert change.cache_bytes_after == per_layer_bytes * len(change.retained) < change.cache_bytes_before
    assert out.stats.cache_bytes == per_layer_bytes * len(deployment_plan(start, 6).retained)


def test_batched_shrink_with_padding_equals_one_by_one(model):
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15]]
    engine = InferenceEngine(model, "all")
    schedule = [(2, "every:2"), (5, "0,4")]
    batched = engine.generate(prompts, max_new_tokens=8, pad_id=0, shrink_at=schedule)
    assert engine.retained == tuple(range(6))  # generate restores the engine's own set
    for row, prompt in enumerate(prompts):
        assert batched.tokens[row] == engine.generate([prompt], 8, shrink_at=schedule).tokens[0]


def test_bad_shrinks_are_refused(model):
    engine = InferenceEngine(model, "every:2")
    with pytest.raises(ValueError, match=r"layers \[3\] hold no cache.*subset of \[0, 2, 4\]"):
        engine.set_retain("every:3")
    cache = engine.new_cache(1, 4)
    with pytest.raises(ValueError, match="can only drop layers"):
        engine.set_retain("all", cache)
    assert engine.retained == (0, 2, 4) and cache.retained == (0, 2, 4)  # a refused switch changes nothing
    with pytest.raises(ValueError, match="must include layer 0"):
        engine.set_retain("2,4")
    with pytest.raises(ValueError, match="never happens"):
        engine.generate([[5]], 4, shrink_at=[(4, "every:4")])
    with pytest.raises(ValueError, match="must increase"):
        engine.generate([[5]], 8, shrink_at=[(3, "every:4"), (2, "0")])
    with pytest.raises(ValueError, match="hold no cache"):
        engine.generate([[5]], 8, shrink_at=[(2, "every:4"), (4, "0,2")])


def test_parse_shrink_at():
    assert parse_shrink_at(["256:every:2,512:every:4"]) == [(256, "every:2"), (512, "every:4")]
    assert parse_shrink_at(["3:0,2,4,6:0", "9:all"]) == [(3, "0,2,4"), (6, "0"), (9, "all")]
    for bad in ("every:2", "x:every:2", "3:", "3:every:2,5"):
        with pytest.raises(ValueError, match="expected N:RETAIN"):
            parse_shrink_at([bad])


def test_cli_shrink_at(tmp_path, capsys, model):
    from test_inference_support import write_model_dir

    model_dir = write_model_dir(tmp_path, model, with_tokenizer=False)
    argv = ["--model", str(model_dir), "--prompt-ids", "5 9 14", "--max-new-tokens", "8", "--no-eos-stop"]
    assert generate_main(argv + ["--retain", "every:1", "--shrink-at", "2:every:2,5:every:4", "--stats"]) == 0
    out = capsys.readouterr().out
    expected = InferenceEngine(model, "all").generate([[5, 9, 14]], 8, shrink_at=[(2, "every:2"), (5, "every:4")])
    assert out.splitlines()[0] == " ".join(map(str, expected.tokens[0]))
    per_layer = 2 * model.cfg.n_kv_heads * model.cfg.resolved_head_dim * 4 * (3 + 8 - 1)  # the last token: never run
    assert f"after 2 new tokens: retained [0, 2, 4], KV cache {6 * per_layer} -> {3 * per_layer} bytes" in out
    assert f"after 5 new tokens: retained [0, 4], KV cache {3 * per_layer} -> {2 * per_layer} bytes" in out
    for bad, message in ((["--retain", "every:2", "--shrink-at", "2:every:3"], "hold no cache"),
                         (["--shrink-at", "8:every:2"], "never happens"),
                         (["--shrink-at", "two:every:2"], "expected N:RETAIN")):
        assert generate_main(argv + bad) == 2
        assert message in capsys.readouterr().err
