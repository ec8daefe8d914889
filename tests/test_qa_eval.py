"""QA evaluation: SQuAD-style EM / F1 against hand-computed cases, and a tiny end-to-end run: a model
directory fine-tuned on QA records (init_from, data.seq_len, loss mask), exported, then megakv-eval --task qa
at four retention plans."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_finetune_sft import qa_records
from train_data import prepare_tiny_dataset
from train_helpers import launch_train, step_losses

from megakv.cli.convert import main as convert_main
from megakv.cli.eval import main as eval_main
from megakv.cli.qa import main as qa_main
from megakv.config import ModelConfig
from megakv.data.sft import QARecord, context_fits, encode_record
from megakv.data.tokenizer import load_tokenizer
from megakv.eval.qa import (
    evaluate_qa,
    evenly_spaced,
    exact_match,
    greedy_answers,
    normalize_answer,
    padding_id,
    predicted_answer,
    stop_ids_of,
    token_f1,
)
from megakv.model import MegaKVModel
from megakv.model_dir import load_model, save_model_dir
from megakv.routing import deployment_plan

SEQ = 128


@pytest.mark.parametrize("prediction, reference, em, f1", [
    ("The Cat!", "cat", 1.0, 1.0),                     # case, punctuation and articles are normalised away
    ("an apple", "Apple.", 1.0, 1.0),
    ("the big red cat", "a red cat sat", 0.0, 2 / 3),  # 2 common of 3 predicted, 2 of 3 reference
    ("Rome", "old Rome", 0.0, 2 / 3),                  # precision 1, recall 1/2
    ("rome rome", "rome", 0.0, 2 / 3),                 # a repeated token counts once per occurrence
    ("paris", "rome", 0.0, 0.0),
    ("", "", 1.0, 1.0),
    ("something", "", 0.0, 0.0),
    ("the", "a", 1.0, 1.0),                            # both normalise to nothing
    ("New  York,   city", "new york city", 1.0, 1.0),
])
def test_exact_match_and_f1_hand_cases(prediction, reference, em, f1):
    assert exact_match(prediction, reference) == em
    assert token_f1(prediction, reference) == pytest.approx(f1)


def test_normalisation_is_squads():
    assert normalize_answer("  The   Battle of the Bulge, 1944! ") == "battle of bulge 1944"
    assert normalize_answer("anthem") == "anthem"  # only whole-word articles go


def test_a_multi_line_reference_keeps_as_many_predicted_lines():
    """Only the prediction's first line was scored: a reference answer of two lines could never score EM 1,
    even when the model wrote exactly it. The cut follows the reference's line count, never its text."""
    generated = " first line\nsecond line\nthe model runs on\n"
    assert predicted_answer(generated, "first line\nsecond line") == "first line\nsecond line"
    assert exact_match(predicted_answer(generated, "first line\nsecond line"), "first line\nsecond line") == 1.0
    assert predicted_answer(generated, "first line") == "first line"
    assert predicted_answer(generated, "other words\nentirely") == "first line\nsecond line"


def test_every_end_id_of_the_model_config_stops_an_answer(qa_setup):
    """An instruct model ends its turn with a config end id (<|im_end|>, <|eot_id|>) other than the tokenizer's
    end token: transformers' generate stops there, and so does the QA evaluation."""
    _, tok_dir = qa_setup
    tokenizer = load_tokenizer(tok_dir)
    cfg = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_hidden=64,
                      max_seq_len=64, eos_token_id=[tokenizer.info.eos_id, 7])
    stops = stop_ids_of(tokenizer, MegaKVModel(cfg), pad_id=0)
    assert {tokenizer.info.eos_id, 7, 0} <= stops


def test_qa_batches_pad_with_an_id_the_model_embeds(qa_setup):
    """A tokenizer pad id beyond the model's embedding rows was an IndexError (megakv-eval --task qa, study)."""
    _, tok_dir = qa_setup
    info = load_tokenizer(tok_dir).info
    small = MegaKVModel(ModelConfig(vocab_size=max(info.pad_id, info.eos_id) + 1, d_model=32, n_layers=2,
                                    n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=64))
    assert padding_id(load_tokenizer(tok_dir), small) == info.pad_id
    tiny = MegaKVModel(ModelConfig(vocab_size=min(info.pad_id, info.eos_id), d_model=32, n_layers=2, n_heads=2,
                                   n_kv_heads=1, ffn_hidden=64, max_seq_len=64))
    assert padding_id(load_tokenizer(tok_dir), tiny) == 0


@pytest.fixture(scope="module")
def qa_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa_eval")
    tok_dir = prepare_tiny_dataset(root / "tok").parent / "tokenizer"
    records = qa_records(160, seed=1)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:140]))
    (root / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[140:]))
    cfg = ModelConfig(vocab_size=320, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=128,
                      max_seq_len=256)
    torch.manual_seed(0)
    save_model_dir(cfg, MegaKVModel(cfg, init_seed=3).state_dict(), root / "base", tokenizer_dir=tok_dir)
    return root, tok_dir


@torch.no_grad()
def greedy_answer(model, prompt: list[int], plan, max_new_tokens: int, stop_ids: set[int],
                  vocab_size: int | None = None) -> list[int]:
    """The reference for greedy_answers: greedy continuation of `prompt` under `plan`, one full forward per
    token, no cache; a stop id, or an id at or above `vocab_size`, ends the answer."""
    ids = torch.tensor([prompt])
    out: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(model(ids, plan=plan)[0, -1].argmax())
        if next_id in stop_ids or (vocab_size is not None and next_id >= vocab_size):
            break
        out.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]])], dim=1)
    return out


def test_greedy_answer_follows_the_models_argmax(qa_setup):
    root, tok_dir = qa_setup
    model = load_model(root / "base")
    plan = deployment_plan("every:2", 4)
    prompt = [5, 17, 42, 9]
    out = greedy_answer(model, prompt, plan, 5, stop_ids=set())
    ids = torch.tensor([prompt])
    for token in out:  # each step is the argmax of a full forward under the same plan
        assert token == int(model(ids, plan=plan)[0, -1].argmax())
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    assert len(out) == 5
    # The batched, cached path (the inference engine, prompts left-padded) answers exactly the same.
    prompts = [prompt, [7, 3], [11, 12, 13, 14, 15, 16, 17]]
    for spec in ("every:1", "every:2", "every:4"):
        plan = deployment_plan(spec, 4)
        expected = [greedy_answer(model, p, plan, 6, stop_ids={2}, vocab_size=300) for p in prompts]
        assert greedy_answers(model, prompts, plan, 6, stop_ids={2}, vocab_size=300, batch_size=2) == expected


def test_answer_loss_is_the_masked_loss_of_the_reference_answer(qa_setup):
    root, tok_dir = qa_setup
    model, tok = load_model(root / "base"), load_tokenizer(tok_dir)
    record = QARecord(**{k: v for k, v in qa_records(1)[0].items() if k != "id"})
    plan = deployment_plan("every:1", 4)
    result, = evaluate_qa(model, tok, [record], {"every:1": plan}, seq_len=SEQ, max_new_tokens=8)
    pad = tok.info.pad_id if tok.info.pad_id is not None else tok.info.eos_id
    tokens, mask = encode_record(tok, record, "cqa", SEQ, tok.info.eos_id, pad, tok.info.bos_id)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor(tokens[None, :-1]), plan=plan)[0].float(), -1)
    counted = torch.tensor(mask[1:]).bool()
    expected = -logprobs[counted].gather(1, torch.tensor(tokens[1:])[counted][:, None]).mean()
    assert result.answer_loss == pytest.approx(float(expected), rel=1e-5)
    assert result.f1 == token_f1(result.examples[0]["predicted"], record.answer)
    # A greedy budget shorter than the reference answer (8 tokens here) would truncate what the model earned.
    with pytest.raises(ValueError, match="shorter than the longest reference answer .8 tokens"):
        evaluate_qa(model, tok, [record], {"every:1": plan}, seq_len=SEQ, max_new_tokens=7)


def test_qa_eval_says_when_the_reference_answer_chose_the_context_window(qa_setup, tmp_path, capsys):
    root, tok_dir = qa_setup
    tok = load_tokenizer(tok_dir)
    short = json.loads((root / "test.jsonl").read_text().splitlines()[0])
    long_context = " ".join(["The fool fights the storm."] * 60) + " The king loves old Rome."
    long = {"context": long_context, "question": "What does the king love?", "answer": "old Rome"}
    assert not context_fits(tok, QARecord(**long), "cqa", SEQ) and context_fits(tok, QARecord(**short), "cqa", SEQ)
    data = tmp_path / "qa.jsonl"
    for records, note in (([short, long, long], "note: 2 of 3 records"),
                          ([short, dict(long, evidence="The king loves old Rome.")], None)):
        data.write_text("".join(json.dumps(r) + "\n" for r in records))
        assert eval_main(["--task", "qa", "--model", str(root / "base"), "--data", str(data), "--retain", "every:1",
                          "--max-new-tokens", "16", "--seq-len", str(SEQ), "--no-progress"]) == 0
        out = capsys.readouterr().out
        assert (note in out) if note else ("note:" not in out)


def test_qa_eval_spread_scores_records_spread_over_the_file(qa_setup, tmp_path):
    # Two "documents" one after the other: --limit 4 takes the first four (all from document A); with
    # --spread it takes two of each, the records evenly_spaced picks, in file order (the JSON keeps the
    # first three scored records as examples).
    root, _ = qa_setup
    records = [dict(r, id=f"{doc}{i}") for doc in "AB" for i, r in enumerate(qa_records(6, seed=2))]
    data = tmp_path / "two_documents.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    ids = {}
    for flags in ((), ("--spread",)):
        out = tmp_path / f"qa{len(flags)}.json"
        assert eval_main(["--task", "qa", "--model", str(root / "base"), "--data", str(data), "--retain", "every:1",
                          "--max-new-tokens", "16", "--seq-len", str(SEQ), "--limit", "4", *flags,
                          "--json", str(out), "--no-progress"]) == 0
        result, = json.loads(out.read_text())["results"]
        assert result["records"] == 4
        ids[flags] = [e["id"] for e in result["examples"]]  # the first three scored records
    assert ids[()] == ["A0", "A1", "A2"]
    assert [r["id"] for r in evenly_spaced(records, 4)] == ["A0", "A3", "B0", "B3"]
    assert ids[("--spread",)] == ["A0", "A3", "B0"]


@pytest.mark.slow
def test_finetune_then_qa_eval_at_every_retention_plan(qa_setup, tmp_path):
    root, tok_dir = qa_setup
    prefix = tmp_path / "data" / "qa_train"
    assert qa_main(["prep", "--input", str(root / "train.jsonl"), "--tokenizer", str(tok_dir),
                    "--output-prefix", str(prefix), "--seq-len", str(SEQ)]) == 0
    config = tmp_path / "finetune.yaml"  # no model: section, init_from supplies it
    config.write_text("routing:\n  q_cross: 0.6\noptim:\n  lr: 3.0e-3\n  warmup_steps: 0\n"
                      "train:\n  steps: 2\n  global_batch: 4\n  micro_batch: 2\ncheckpoint:\n  every: 0\n"
                      "validation:\n  every: 2\n  samples: 8\nlogging:\n  tensorboard: false\n")
    run_dir = tmp_path / "run"
    run = launch_train([f"checkpoint.init_from={root / 'base'}", f"data.datasets=[{prefix}]", f"data.seq_len={SEQ}",
                        "data.valid_fraction=0.1", f"train.run_dir={run_dir}"], nproc=1, config=config)
    assert run.ok, run.output[-4000:]
    assert sorted(step_losses(run_dir)) == [1, 2] and all(math.isfinite(v) for v in step_losses(run_dir).values())
    assert convert_main(["from-checkpoint", str(run_dir), str(tmp_path / "tuned")]) == 0
    assert load_model(tmp_path / "tuned").cfg.max_seq_len == 256  # the model's context, not the 128 window

    out = tmp_path / "qa.json"
    code = eval_main(["--task", "qa", "--model", str(tmp_path / "tuned"), "--data", str(root / "test.jsonl"),
                      "--retain", "every:1", "every:2", "every:3", "every:4", "--max-new-tokens", "16",
                      "--seq-len", str(SEQ), "--json", str(out), "--no-progress"])
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["retain"] for r in report["results"]] == ["every:1", "every:2", "every:3", "every:4"]
    for r in report["results"]:
        assert r["records"] == 20 and 0.0 <= r["exact_match"] <= r["f1"] + 1e-9 <= 1.0 + 1e-9
        assert math.isfinite(r["answer_loss"]) and r["answer_loss"] > 0
    # Sharing the cache changes what the model computes: the plans' answer losses are not all equal.
    assert len({round(r["answer_loss"], 6) for r in report["results"]}) > 1

    missing = eval_main(["--task", "qa", "--model", str(tmp_path / "tuned"), "--data", str(tmp_path / "nope.jsonl")])
    assert missing == 2
    short = eval_main(["--task", "qa", "--model", str(tmp_path / "tuned"), "--data", str(root / "test.jsonl"),
                       "--max-new-tokens", "1", "--seq-len", str(SEQ), "--no-progress"])
    assert short == 2  # no reference answer here is one token: a 1-token budget is refused
