"""Evaluation at several retention plans and the cache-budget planner."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_inference_support import VOCAB, tiny_model, write_indexed_split

import megakv.eval.loss as eval_loss
from megakv.eval.data import load_eval_tokens, make_windows
from megakv.eval.loss import evaluate_plans, mean_loss
from megakv.eval.report import format_table, plot_loss_vs_retention, write_json
from megakv.planner import (
    CacheBudget,
    budget_from_bytes,
    budget_from_fraction,
    every_k,
    parse_budget,
    plan_with_model,
    search_retained_sets,
)
from megakv.routing import deployment_plan


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=5)


@pytest.fixture(scope="module")
def windows(tmp_path_factory):
    prefix = write_indexed_split(tmp_path_factory.mktemp("data") / "val_text_document", n_docs=10, doc_len=40)
    return make_windows(load_eval_tokens(prefix), seq_len=32, vocab_size=VOCAB)


def test_windows_cover_every_token_once():
    tokens = np.arange(1, 22)
    w = make_windows(tokens, seq_len=5, vocab_size=100)
    assert w.shape == (4, 6)
    assert w[:, 1:].flatten().tolist() == list(range(2, 22))  # each target exactly once
    assert make_windows(np.array([3, 4, 5]), seq_len=10, vocab_size=10).tolist() == [[3, 4, 5]]
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        make_windows(np.array([1, 2, 500]), seq_len=2, vocab_size=100)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        make_windows(np.array([1]), seq_len=2, vocab_size=100)


def test_indexed_data_is_read_by_prefix_or_file_name(tmp_path):
    prefix = write_indexed_split(tmp_path / "split", n_docs=3, doc_len=5)
    tokens = load_eval_tokens(prefix)
    assert len(tokens) == 18
    assert np.array_equal(load_eval_tokens(f"{prefix}.bin"), tokens)
    assert len(load_eval_tokens(prefix, max_tokens=7)) == 7
    with pytest.raises(FileNotFoundError, match="not found"):
        load_eval_tokens(tmp_path / "nothing")


def test_loss_matches_a_direct_computation(model, windows, monkeypatch):
    plan = deployment_plan("every:2", 6)
    loss, count = mean_loss(model, plan, windows, batch_size=3)
    with torch.no_grad():
        logits = model(windows[:, :-1], plan=plan)
    direct = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten()).item()
    assert count == windows[:, 1:].numel()
    assert math.isclose(loss, direct, rel_tol=1e-5)
    # The head scored a few positions at a time (as for a long window and a large vocabulary): the same loss.
    monkeypatch.setattr(eval_loss, "LOGIT_CHUNK_ELEMENTS", 7 * model.cfg.vocab_size)
    assert math.isclose(mean_loss(model, plan, windows, batch_size=3)[0], direct, rel_tol=1e-5)


def test_evaluate_plans_table_json_and_plot(model, windows, tmp_path):
    results = evaluate_plans(model, ["every:1", "every:2", "every:3", "0,5"], windows, batch_size=4)
    assert [r.retained for r in results] == [(0, 1, 2, 3, 4, 5), (0, 2, 4), (0, 3), (0, 5)]
    assert [r.kv_bytes_per_token for r in results] == [2 * n * 2 * 16 * 2 for n in (6, 3, 2, 2)]
    assert len({round(r.loss, 6) for r in results}) == 4  # plans really differ
    assert all(math.isclose(r.perplexity, math.exp(r.loss)) for r in results)
    table = format_table(results)
    assert "every:2" in table and "50.0%" in table
    data = json.loads(write_json(results, tmp_path / "r.json", model="m").read_text())
    assert data["model"] == "m" and data["results"][1]["retained"] == [0, 2, 4]
    png = plot_loss_vs_retention(results, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_budgets_and_their_errors(model):
    cfg = model.cfg
    assert budget_from_fraction(0.5, 6).max_layers == 3
    assert budget_from_fraction(1 / 3, 6).max_layers == 2
    assert parse_budget("50%", cfg, torch.bfloat16).max_layers == 3
    per_layer = 2 * 2 * 16 * 2
    assert parse_budget(f"{2 * per_layer + 1}B", cfg, torch.bfloat16).max_layers == 2
    assert budget_from_bytes(10**9, cfg, torch.bfloat16).max_layers == 6
    with pytest.raises(ValueError, match="below one layer"):
        budget_from_fraction(0.1, 6)
    with pytest.raises(ValueError, match=f"below one layer's cache .*at least {per_layer}"):
        budget_from_bytes(per_layer - 1, cfg, torch.bfloat16)
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        budget_from_fraction(1.5, 6)
    with pytest.raises(ValueError, match="bad budget"):
        parse_budget("lots", cfg, torch.bfloat16)


def test_search_finds_a_better_set_than_every_k():
    # A synthetic loss that prefers layers 1 and 5: no every-k pattern within 3 layers holds both.
    def loss_of(retained):
        return 10.0 - 2.0 * (1 in retained) - 2.0 * (5 in retained) - 0.1 * len(retained)

    result = search_retained_sets(8, CacheBudget(3, "3 layers"), loss_of)
    assert set(result.best.retained) == {0, 1, 5}
    assert result.best.loss < result.best_every_k.loss
    assert [c.found_by for c in result.every_k] == [f"every:{k}" for k in range(3, 9)]
    assert all(len(c.retained) <= 3 for c in result.every_k)


def test_search_respects_the_evaluation_allowance():
    result = search_retained_sets(12, CacheBudget(4, "4"), lambda s: -sum(s), max_evaluations=9)
    assert len(result.every_k) == 10  # every:3 .. every:12 fit in 4 layers; always scored
    assert result.evaluations == 10 + 9
    assert len(result.best.retained) <= 4 and result.best.retained[0] == 0


@pytest.mark.parametrize("fraction", [0.34, 0.5, 0.67])
def test_planner_on_a_model_is_within_budget_and_never_worse_than_every_k(model, windows, fraction):
    budget = budget_from_fraction(fraction, 6)
    result = plan_with_model(model, windows, budget, batch_size=8, max_evaluations=40)
    assert len(result.best.retained) <= budget.max_layers and result.best.retained[0] == 0
    every = [mean_loss(model, deployment_plan(list(every_k(6, k)), 6), windows)[0]
             for k in range(1, 7) if len(every_k(6, k)) <= budget.max_layers]
    assert result.best.loss <= min(every) + 1e-9
    # the reported loss is the real loss of the reported set
    assert math.isclose(mean_loss(model, deployment_plan(list(result.best.retained), 6), windows)[0],
                        result.best.loss, rel_tol=1e-9)
