"""megakv-eval / megakv-plan say what they scored, read raw data as megakv-prep does, and refuse cleanly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_inference_support import random_text, tiny_model, write_indexed_split, write_model_dir

from megakv.cli.eval import build_parser
from megakv.cli.eval import main as eval_main
from megakv.cli.plan import main as plan_main
from megakv.data.indexed import IndexedDataset
from megakv.eval.loss import PlanLoss
from megakv.eval.report import label_placements


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("cli"), tiny_model(seed=6))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_indexed_split(tmp_path_factory.mktemp("data") / "val", n_docs=8, doc_len=30)


def test_help_shows_the_defaults_that_limit_what_is_scored():
    text = " ".join(build_parser().format_help().split())
    assert "0 scores all (default: 65536)" in text and "(default: 8)" in text and "--text-key" in text


def test_output_says_how_many_tokens_of_how_many_were_scored(model_dir, split, capsys):
    total = IndexedDataset(split).num_tokens  # 8 x 31
    assert eval_main(["--model", str(model_dir), "--data", str(split), "--retain", "all", "--seq-len", "16",
                      "--max-tokens", "100"]) == 0
    captured = capsys.readouterr()
    # 100 tokens -> 6 windows of 16 predicted tokens (one boundary token shared between windows)
    assert f"scored 96 of {total:,} tokens in 6 windows of 16; --max-tokens 100 (0 scores all)" in captured.out
    assert eval_main(["--model", str(model_dir), "--data", str(split), "--retain", "all", "--seq-len", "16",
                      "--max-tokens", "0"]) == 0
    assert f"scored {(total - 1) // 16 * 16} of {total:,} tokens" in capsys.readouterr().out


def test_progress_bar_shows_a_rate(model_dir, split, capsys):
    assert eval_main(["--model", str(model_dir), "--data", str(split), "--retain", "all", "every:2",
                      "--seq-len", "16", "--batch-size", "2"]) == 0
    err = capsys.readouterr().err
    assert "evaluating" in err and "windows/s" in err and "30/30" in err  # 2 plans x 15 windows
    assert eval_main(["--model", str(model_dir), "--data", str(split), "--retain", "all", "--seq-len", "16",
                      "--no-progress"]) == 0
    assert "evaluating" not in capsys.readouterr().err


def test_plan_shows_progress_with_an_upper_bound(model_dir, split, capsys):
    assert plan_main(["--model", str(model_dir), "--data", str(split), "--budget", "50%", "--seq-len", "16",
                      "--max-evaluations", "5"]) == 0
    err = capsys.readouterr().err
    assert "searching (ETA: at most)" in err and "windows/s" in err


def test_jsonl_and_parquet_are_read_as_megakv_prep_reads_them(model_dir, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from megakv.data.preprocess import PrepOptions, preprocess

    docs = [random_text(40, seed=s) for s in range(6)]
    jsonl = tmp_path / "held_out.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    pq.write_table(pa.table({"body": docs}), tmp_path / "held_out.parquet")
    preprocess([str(jsonl)], model_dir / "tokenizer", tmp_path / "prep" / "d", progress=False,
               options=PrepOptions(text_key="body"))
    losses = {}
    for name, data in (("prep", tmp_path / "prep" / "d"), ("jsonl", jsonl), ("parquet", tmp_path / "held_out.parquet")):
        out_json = tmp_path / f"{name}.json"
        assert eval_main(["--model", str(model_dir), "--data", str(data), "--retain", "all", "--text-key", "body",
                          "--seq-len", "32", "--json", str(out_json), "--no-progress"]) == 0
        losses[name] = json.loads(out_json.read_text())["results"][0]
    capsys.readouterr()
    assert losses["jsonl"]["tokens"] == losses["prep"]["tokens"] == losses["parquet"]["tokens"]
    assert losses["jsonl"]["loss"] == pytest.approx(losses["prep"]["loss"], abs=1e-6)
    assert losses["parquet"]["loss"] == pytest.approx(losses["prep"]["loss"], abs=1e-6)
    # the wrong key is an error, not a score of the raw JSON
    assert eval_main(["--model", str(model_dir), "--data", str(jsonl), "--retain", "all"]) == 2
    err = capsys.readouterr().err
    assert "no usable text for the text key 'text' (missing_field=6)" in err and "--text-key" in err


def test_seq_len_beyond_the_model_context_warns(model_dir, split, capsys):
    assert eval_main(["--model", str(model_dir), "--data", str(split), "--retain", "all", "--seq-len", "128",
                      "--no-progress"]) == 0
    assert "warning: --seq-len 128 exceeds the model's context of 64 tokens" in capsys.readouterr().err


def test_a_device_this_machine_lacks_is_one_clear_error(model_dir, split, capsys):
    missing = "cuda:99" if torch.cuda.is_available() else "cuda"
    for main in (eval_main, plan_main):
        extra = ["--budget", "0.5"] if main is plan_main else []
        assert main(["--model", str(model_dir), "--data", str(split), "--device", missing, *extra]) == 2
        err = capsys.readouterr().err
        assert f"--device = '{missing}'" in err and "Fix: pass --device cpu" in err and "Traceback" not in err


def _result(retain: str, retained: tuple[int, ...], loss: float) -> PlanLoss:
    return PlanLoss(retain, retained, len(retained) / 6, 512 * len(retained), "bfloat16", loss, float(np.exp(loss)),
                    100)


def test_plot_labels_never_overprint():
    results = [_result("every:1", (0, 1, 2, 3, 4, 5), 2.0), _result("every:3", (0, 3), 2.1),
               _result("every:4", (0, 4), 2.1), _result("every:6", (0,), 2.5), _result("every:9", (0,), 2.5)]
    placed = label_placements(results)
    assert [label for *_, label, _offset, _align in placed] == ["every:6 = every:9", "every:3", "every:4", "every:1"]
    anchors = [(x, round(y, 3), offset) for x, y, _label, offset, _align in placed]
    assert len(set(anchors)) == len(anchors)
    assert placed[1][3] != placed[2][3]  # same bytes and loss: labels on different sides


def test_plot_is_written_with_a_reference_line(tmp_path):
    from megakv.eval.report import plot_loss_vs_retention

    path = plot_loss_vs_retention([_result("every:1", (0, 1, 2, 3, 4, 5), 2.0), _result("every:2", (0, 2, 4), 2.001)],
                                  tmp_path / "p.png")
    assert path.stat().st_size > 1000
