"""The offline QA set (speaker attribution built from plays) and the shipped finetune.yaml recipe."""

from __future__ import annotations

import json
import math

import pytest
import torch

from megakv.cli.qa import main as qa_main
from megakv.config import ConfigError, ModelConfig, load_config
from megakv.data.errors import DataError
from megakv.data.qa_build import build_qa_set, built_settings, guesses, speeches
from megakv.model import MegaKVModel
from megakv.model_dir import save_model_dir
from megakv.recipes import path as recipe_path

NAMES = ["HAMLET", "OPHELIA", "POLONIUS", "LAERTES", "GERTRUDE", "CLAUDIUS", "HORATIO", "OSRIC"]


def write_plays(root, count: int = 12):
    root.mkdir(parents=True, exist_ok=True)
    for p in range(count):
        blocks = [f"THE PLAY NUMBER {p}", "ACT I", "SCENE I. A room."]
        for s in range(60):
            who = NAMES[(s * 3 + p) % len(NAMES)]
            blocks.append(f"{who}\nIn play {p} speech {s} the {who.lower()} speaks at length here,\n"
                          f"and says a second line of {s + p} words.")
        (root / f"play{p:02d}.md").write_text("\n\n".join(blocks) + "\n")
    return root


def test_speeches_are_read_as_printed():
    text = "ACT I\n\nSCENE II. A hall.\n\nHAMLET\nTo be, or not to be.\nThat is the question.\n\nEnter OPHELIA\n"
    assert speeches(text) == [("HAMLET", ["To be, or not to be.", "That is the question."])]


def _built(tmp_path, kind: str) -> dict[str, list[dict]]:
    source = write_plays(tmp_path / "plays")
    assert qa_main(["build", "--output-dir", str(tmp_path / kind), "--source", str(source), "--max-records", "600",
                    "--kind", kind]) == 0
    splits = {s: [json.loads(line) for line in (tmp_path / kind / f"{s}.jsonl").read_text().splitlines()]
              for s in ("train", "valid", "test")}
    assert all(splits.values())
    plays = {s: {r["play"] for r in records} for s, records in splits.items()}
    assert len(plays["test"]) == len(plays["valid"]) == 4 and not plays["test"] & plays["train"]
    assert not plays["valid"] & plays["train"] and not plays["test"] & plays["valid"]
    assert built_settings(tmp_path / kind) == {"kind": kind, "seed": 1234, "max_records": 600,
                                               "source": str(source.resolve())}
    assert "random would score EM" in (tmp_path / kind / "README.md").read_text()
    return splits



@pytest.mark.parametrize("max_records, words", [("0", "asks for no records"), ("-5", "asks for no records"),
                                                ("5", "fewer than one record per play")])
def test_build_refuses_a_record_count_it_cannot_honour(tmp_path, capsys, max_records, words):
    """It wrote one record per play (12 here) and exited 0 whatever --max-records asked."""
    source = write_plays(tmp_path / "plays")
    assert qa_main(["build", "--output-dir", str(tmp_path / "qa"), "--source", str(source), "--max-records",
                    max_records]) == 2
    assert words in capsys.readouterr().err and not (tmp_path / "qa").exists()

def _speeches_of(context: str) -> list[list[str]]:
    return [block.split("\n") for block in context.split("\n\n")]


def test_built_speaker_records_are_extractive_unique_and_held_out_by_play(tmp_path):
    splits = _built(tmp_path, "speaker")
    for record in splits["train"] + splits["test"]:
        quoted = record["question"].removeprefix('Who says "').removesuffix('"?')
        assert len(record["context"]) <= 1200
        # The answer is the speaker printed above the quoted line, and that line occurs once in the passage.
        speaker_of = {line: speech[0] for speech in _speeches_of(record["context"]) for line in speech[1:]}
        matching = [line for line in speaker_of if line.rstrip(",;:") == quoted]
        assert len(matching) == 1 and speaker_of[matching[0]] == record["answer"]
        assert record["evidence"] == matching[0]  # the line as printed: what a trimmed context keeps


def test_built_next_line_records_answer_the_line_after_the_quoted_one(tmp_path):
    splits = _built(tmp_path, "next-line")
    for record in splits["train"] + splits["test"]:
        quoted = record["question"].removeprefix('Which line follows "').removesuffix('"?')
        assert record["question"] != quoted and len(record["context"]) <= 1200
        spoken = [line for speech in _speeches_of(record["context"]) for line in speech[1:]]
        # The quoted line occurs once; the answer is the next line of the same speech, also unique.
        pairs = [(line, after) for speech in _speeches_of(record["context"])
                 for line, after in zip(speech[1:], speech[2:]) if line.rstrip(",;:") == quoted]
        assert len(pairs) == 1 and pairs[0][1] == record["answer"] and spoken.count(record["answer"]) == 1
        assert record["evidence"] == "\n".join(pairs[0]) and record["evidence"] in record["context"]
        # A guess is another line of the passage, the answer among them, never the quoted line.
        options = guesses("next-line", record["context"], record["evidence"])
        assert record["answer"] in options and pairs[0][0] not in options and len(options) == len(spoken) - 1


def test_qa_build_refuses_bad_input(tmp_path, capsys):
    assert qa_main(["build", "--output-dir", str(tmp_path / "x"), "--source", str(tmp_path / "empty")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(DataError, match="unknown question kind 'who'.*choose one of next-line, speaker"):
        build_qa_set(tmp_path / "x", source=write_plays(tmp_path / "plays"), kind="who")
    assert not (tmp_path / "x").exists()  # refused before writing anything


def test_the_finetune_recipe_has_the_papers_settings_and_takes_the_models_section(tmp_path):
    cfg_model = ModelConfig(vocab_size=320, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                            max_seq_len=8192)
    torch.manual_seed(0)
    save_model_dir(cfg_model, MegaKVModel(cfg_model, init_seed=1).state_dict(), tmp_path / "base")
    cfg = load_config(recipe_path("finetune"), [f"checkpoint.init_from={tmp_path / 'base'}"])
    assert cfg.model == cfg_model and cfg.model.max_seq_len == 8192 and cfg.seq_len == 384
    assert cfg.routing.strategy == "rcla" and cfg.routing.q_cross == 0.6
    assert (cfg.optim.beta1, cfg.optim.beta2, cfg.optim.weight_decay) == (0.9, 0.95, 0.1)
    # Warm-up over 1.5% of the steps, then linear decay to zero at the last step.
    assert cfg.optim.warmup_steps == math.ceil(0.015 * cfg.train.steps)
    assert cfg.optim.schedule == "wsd" and cfg.optim.wsd_decay_style == "linear" and cfg.optim.min_lr_ratio == 0
    assert cfg.optim.warmup_steps + cfg.optim.wsd_decay_steps == cfg.train.steps
    with pytest.raises(ConfigError, match="takes the model section from") as refused:
        load_config(recipe_path("finetune"), [f"checkpoint.init_from={tmp_path / 'base'}", "model.n_layers=6"])
    assert refused.value.field == "model.n_layers"
    # Without init_from the recipe names what is missing (it used to blame data.seq_len against the default model).
    with pytest.raises(ConfigError, match="names none") as missing:
        load_config(recipe_path("finetune"))
    assert missing.value.field == "checkpoint.init_from"


def test_qa_build_keeps_a_set_already_there_unless_told(tmp_path, capsys):
    """A second build into the same directory (another seed re-splits the plays: a model fine-tuned on the old
    train split could be scored on its own training records) or into a directory with the user's README.md
    replaced the files and exited 0."""
    source = write_plays(tmp_path / "plays")
    build = ["build", "--output-dir", str(tmp_path / "qa"), "--source", str(source), "--max-records", "600"]
    assert qa_main(build) == 0
    train = (tmp_path / "qa" / "train.jsonl").read_text()
    assert qa_main([*build, "--seed", "7"]) == 2
    assert "already holds train.jsonl, valid.jsonl, test.jsonl, build.json, README.md" in capsys.readouterr().err
    assert (tmp_path / "qa" / "train.jsonl").read_text() == train
    assert qa_main([*build, "--seed", "7", "--overwrite"]) == 0
    assert (tmp_path / "qa" / "train.jsonl").read_text() != train
