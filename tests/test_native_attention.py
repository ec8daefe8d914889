"""The native decode-attention kernel: the same numbers as torch's SDPA (the independent reference) over
head sizes, GQA groups, key counts, masks, cache-view strides and threads; the engine's decode with it
equals the full forward and the engine without it; it is built once, atomically, per compiler and CPU;
without a working compiler the engine falls back to SDPA and still computes the same thing."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from test_inference_support import PAD_ID, VOCAB, tiny_model

from megakv.inference.engine import InferenceEngine
from megakv.inference.native_attention import DecodeAttentionKernel, NativeDecodeAttention, build_library
from megakv.inference.padding import left_pad, positions_from_valid
from megakv.model import Attention
from megakv.routing import deployment_plan


@pytest.fixture(scope="module")
def kernel() -> DecodeAttentionKernel:
    loaded = DecodeAttentionKernel.load()
    assert loaded is not None, "this machine has a C compiler: the kernel must build (see the log for why not)"
    return loaded


def reference(q, k, v, key_valid=None):
    """SDPA with the query heads of each K/V head as its rows (what the engine ran before the kernel)."""
    mask = None if key_valid is None else key_valid[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def cache_views(batch, kv_heads, keys, head_dim, capacity, generator, scale=1.0):
    """K/V as the cache holds them: the first `keys` positions of a (2, batch, heads, capacity, dim) buffer."""
    buffer = torch.randn(2, batch, kv_heads, capacity, head_dim, generator=generator) * scale
    return buffer[0][:, :, :keys], buffer[1][:, :, :keys]


@pytest.mark.parametrize("head_dim", [16, 64, 80, 128])
@pytest.mark.parametrize("group", [1, 3, 4, 7])
@pytest.mark.parametrize("keys", [1, 15, 16, 17, 300, 529])  # 256-key blocks, 16-key steps, tails
def test_kernel_equals_sdpa(kernel, head_dim, group, keys):
    generator = torch.Generator().manual_seed(head_dim * 1000 + group * 10 + keys)
    q = torch.randn(2, 3, group, head_dim, generator=generator)
    k, v = cache_views(2, 3, keys, head_dim, keys + 5, generator)
    assert not k.is_contiguous()  # the cache's strides, not a packed copy
    with torch.no_grad():
        assert (kernel(q, k, v) - reference(q, k, v)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_masks_and_threads(kernel, threads):
    generator = torch.Generator().manual_seed(threads)
    q = torch.randn(5, 2, 4, 64, generator=generator)
    k, v = cache_views(5, 2, 203, 64, 256, generator)
    key_valid = torch.rand(5, 203, generator=generator) > 0.4
    key_valid[:, -1] = True  # the query's own position
    key_valid[0] = False
    key_valid[0, -1] = True  # a row that sees only itself
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            got = kernel(q, k, v, key_valid)
            expected = reference(q, k, v, key_valid)
    finally:
        torch.set_num_threads(previous)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (got[0] - v[0, :, -1:].expand(2, 4, 64)).abs().max().item() <= 1e-6  # all weight on its own key
    k_masked = k.clone()
    k_masked[~key_valid[:, None, :, None].expand_as(k)] = 1e4  # masked keys carry no weight at all
    with torch.no_grad():
        assert (kernel(q, k_masked, v, key_valid) - got).abs().max().item() <= 1e-6


def test_kernel_exp_over_a_wide_score_range(kernel):
    """Scores spread over hundreds (large activations): the polynomial exp and the max shift hold up, as
    close to a float64 reference as SDPA itself is (here the kernel is ~4e-6 off, SDPA ~2e-5)."""
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(1, 1, 4, 64, generator=generator) * 6
    k, v = cache_views(1, 1, 1000, 64, 1000, generator, scale=6)
    with torch.no_grad():
        exact = reference(q.double(), k.double(), v.double())
        kernel_error = (kernel(q, k, v) - exact).abs().max().item()
        sdpa_error = (reference(q, k, v) - exact).abs().max().item()
    assert kernel_error <= max(sdpa_error, 1e-5)


def test_handles_only_what_the_kernel_computes(kernel):
    q, kv = torch.randn(1, 4, 1, 64), torch.randn(1, 2, 9, 64)
    with torch.no_grad():
        assert kernel.handles(q, kv, kv)
        assert not kernel.handles(q.bfloat16(), kv.bfloat16(), kv.bfloat16())
        assert not kernel.handles(torch.randn(1, 4, 2, 64), kv, kv)  # two query positions: prefill path
        assert not kernel.handles(torch.randn(1, 4, 1, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8))
        assert not kernel.handles(q, kv.transpose(-1, -2).contiguous().transpose(-1, -2), kv)  # strided rows
    assert not kernel.handles(q, kv, kv)  # autograd on: training never takes the kernel


@pytest.mark.parametrize("retain", ["all", "every:2", "every:3", "0,4"])
def test_engine_decode_with_the_kernel_equals_full_forward(kernel, retain, monkeypatch):
    """head_dim 32, GQA 4/2, a left-padded batch (the masked path) and an unpadded one."""
    calls: list = []
    run_kernel = DecodeAttentionKernel.__call__
    monkeypatch.setattr(DecodeAttentionKernel, "__call__",
                        lambda self, q, k, v, key_valid: calls.append((tuple(q.shape), key_valid is not None))
                        or run_kernel(self, q, k, v, key_valid))
    model = tiny_model(seed=3, d_model=128)
    engine = InferenceEngine(model, retain)
    assert engine.attention_kernel is not None
    assert all(type(layer.attn) is NativeDecodeAttention for layer in engine._runner.layers)
    assert type(model.layers[0].attn) is Attention  # the model itself is never changed
    ids = torch.randint(0, VOCAB, (3, 14), generator=torch.Generator().manual_seed(2))
    positions = model.default_positions(ids)
    cache = engine.new_cache(3, 14)
    engine.step(ids[:, :6], cache, positions[:, :6])
    got = torch.cat([engine.step(ids[:, t:t + 1], cache, positions[:, t:t + 1]) for t in range(6, 14)], 1)
    with torch.no_grad():
        expected = model(ids, plan=deployment_plan(retain, 6))[:, 6:]
    assert (got - expected).abs().max().item() <= 1e-5
    assert len(calls) == 8 * model.cfg.n_layers  # every decode step of every layer took the kernel
    assert set(calls) == {((3, 2, 2, 32), False)}
    calls.clear()

    prompts = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15]]
    with_kernel = engine.generate(prompts, max_new_tokens=6, pad_id=PAD_ID)
    assert set(calls) == {((3, 2, 2, 32), True)}  # padded: every decode step took the kernel with its key mask
    sdpa_engine = InferenceEngine(model, retain, native_attention=False)
    assert with_kernel.tokens == sdpa_engine.generate(prompts, 6, pad_id=PAD_ID).tokens

    # Padded decode logits, step by step, against the engine without the kernel.
    ids, valid = left_pad([p + [20, 21, 22, 23] for p in prompts], PAD_ID)
    positions = positions_from_valid(valid)
    logits = []
    for one in (engine, sdpa_engine):
        cache = one.new_cache(3, ids.shape[1])
        one.step(ids[:, :6], cache, positions[:, :6], valid[:, :6])
        logits.append(torch.cat([one.step(ids[:, t:t + 1], cache, positions[:, t:t + 1], valid[:, :t + 1])
                                 for t in range(6, ids.shape[1])], 1))
    assert (logits[0] - logits[1]).abs().max().item() <= 1e-5


def test_built_once_atomically(tmp_path, monkeypatch):
    first = build_library(tmp_path)
    assert first is not None and first.parent == tmp_path / "kernels"
    stamp = first.stat().st_mtime_ns
    assert build_library(tmp_path) == first and first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in (tmp_path / "kernels").iterdir()] == [first.name]  # no partial build left behind
    monkeypatch.setattr("megakv.inference.native_attention.cpu_identity", lambda: "another CPU")
    other = build_library(tmp_path)
    assert other is not None and other != first  # a -march=native build is never reused on another CPU


def test_no_compiler_falls_back_to_sdpa(tmp_path, monkeypatch, caplog):
    model = tiny_model(seed=5)
    expected = InferenceEngine(model, "every:2").generate([[5, 6, 7]], max_new_tokens=5)
    monkeypatch.setenv("MEGAKV_CACHE", str(tmp_path))
    failing = tmp_path / "failing-cc"  # a "compiler" that fails every build, logging each call
    failing.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls.log'}\necho 'no such flag' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    with caplog.at_level(logging.WARNING, logger="megakv.inference.native_attention"):
        engine = InferenceEngine(model, "every:2")
    assert engine.attention_kernel is None
    assert "could not build" in caplog.text and "using SDPA" in caplog.text and "no such flag" in caplog.text
    left = sorted(p.suffix for p in (tmp_path / "kernels").iterdir())
    assert left == [".failed"] * 2  # no library, no partial build: a record of each rejected flag set ...
    assert engine.generate([[5, 6, 7]], max_new_tokens=5).tokens == expected.tokens

    def builds() -> int:
        return sum("-shared" in line for line in (tmp_path / "calls.log").read_text().splitlines())

    assert builds() == 3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="megakv.inference.native_attention"):
        assert InferenceEngine(model, "every:2").attention_kernel is None
    # ... which later processes skip (each tried them all again: 7 calls in 3 runs); the plain -O3 build is
    # tried again, its failure being the environment's (a full disk, a killed compiler), not its flags'
    assert builds() == 4 and "no such flag" in caplog.text and "delete it to try again" in caplog.text
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert DecodeAttentionKernel.load() is None


def test_the_python_limits_match_the_kernel_source():
    """native_attention.py refuses shapes the C kernel's fixed arrays cannot hold: its limits must be the ones
    kernels/decode_attention.c #defines (16-float chunks of head_dim, rows per K/V head, and the accumulator
    array acc[MAX_CHUNKS * MAX_ROWS / 8] that bounds group * head_dim)."""
    import re

    from megakv.inference import native_attention

    source = native_attention.SOURCE.read_text()
    defines = {name: int(value) for name, value in re.findall(r"^#define (\w+) (\d+)\b", source, re.MULTILINE)}
    assert "acc[MAX_CHUNKS * MAX_ROWS / 8]" in source and "G * (D / 16) > MAX_CHUNKS * MAX_ROWS / 8" in source
    assert native_attention.MAX_HEAD_DIM == 16 * defines["MAX_CHUNKS"]
    assert native_attention.MAX_GROUP == defines["MAX_ROWS"]
    assert native_attention.MAX_GROUP_WIDTH == 16 * defines["MAX_CHUNKS"] * defines["MAX_ROWS"] // 8
