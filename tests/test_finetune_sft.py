"""Supervised QA data: the paper's order augmentation, the loss mask in prepared samples, and a training
loss in which masked tokens contribute nothing (value and gradients)."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_data import prepare_tiny_dataset

from megakv.cli.qa import main as qa_main
from megakv.config import load_config
from megakv.data.errors import DataError
from megakv.data.indexed import IndexedDataset, IndexedWriter
from megakv.data.loader import build_data, micro_batches
from megakv.data.sft import (
    IGNORE,
    QARecord,
    choose_orders,
    context_fits,
    encode_record,
    inputs_and_labels,
    mask_prefix,
    prepare_sft,
    read_qa_records,
)
from megakv.data.tokenizer import load_tokenizer
from megakv.parallel.runners import causal_lm_loss, weighted_label_count, weighted_token_loss

SEQ = 128
OBJECTS = ["the crown", "his sword", "the night", "her father", "the sea", "a letter", "the storm", "old Rome"]


def qa_records(count: int, seed: int = 0) -> list[dict]:
    rng = np.random.RandomState(seed)
    out = []
    for i in range(count):
        loved, feared = rng.choice(len(OBJECTS), 2, replace=False)
        out.append({"id": f"r{i}", "context": f"The king loves {OBJECTS[loved]}. The fool fights {OBJECTS[feared]}.",
                    "question": "What does the king love?", "answer": OBJECTS[loved]})
    return out


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return prepare_tiny_dataset(tmp_path_factory.mktemp("sft_tok")).parent / "tokenizer"


@pytest.fixture(scope="module")
def qa_dataset(tmp_path_factory, tokenizer_dir):
    root = tmp_path_factory.mktemp("sft_data")
    (root / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa_records(200)))
    prefix = root / "out" / "qa_train"
    assert qa_main(["prep", "--input", str(root / "qa.jsonl"), "--tokenizer", str(tokenizer_dir),
                    "--output-prefix", str(prefix), "--seq-len", str(SEQ)]) == 0
    return prefix


def test_order_augmentation_is_seeded_and_half_and_half():
    orders = choose_orders(20000, seed=3)
    share = orders.count("qca") / len(orders)
    assert abs(share - 0.5) < 0.015  # binomial sd 0.0035: 4 sd
    assert orders == choose_orders(20000, seed=3) and orders != choose_orders(20000, seed=4)
    # No serial pattern: the next record's order is independent of this one's.
    pairs = sum(a == b for a, b in zip(orders, orders[1:])) / (len(orders) - 1)
    assert abs(pairs - 0.5) < 0.015
    assert set(choose_orders(100, seed=1, p_question_first=0.0)) == {"cqa"}
    assert abs(choose_orders(20000, seed=1, p_question_first=0.8).count("qca") / 20000 - 0.8) < 0.015


def test_a_record_is_prompt_then_counted_answer_then_padding(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    eos, pad = tok.info.eos_id, 0
    record = QARecord("The king loves the sea.", "What does the king love?", "the sea")
    for order, first in (("qca", "Question:"), ("cqa", "Context:")):
        tokens, mask = encode_record(tok, record, order, SEQ, eos, pad)
        assert tokens.shape == mask.shape == (SEQ,)
        counted = tokens[mask == 1].tolist()
        assert counted[-1] == eos and tok.decode(counted[:-1]).strip() == "the sea"
        prompt = tokens[:np.flatnonzero(mask)[0]].tolist()
        assert tok.decode(prompt).startswith(first) and tok.decode(prompt).rstrip().endswith("Answer:")
        assert (tokens[np.flatnonzero(mask)[-1] + 1:] == pad).all()
    # A long context is trimmed to a window that still holds the answer.
    long = QARecord(" ".join(["The fool fights the storm."] * 40) + " The king loves old Rome. " +
                    " ".join(["The maid remembers a letter."] * 40), "What does the king love?", "old Rome")
    tokens, mask = encode_record(tok, long, "cqa", SEQ, eos, pad)
    prompt = tok.decode(tokens[:np.flatnonzero(mask)[0]].tolist())
    assert "old Rome" in prompt and mask.sum() > 1


def test_a_trimmed_context_is_centred_on_the_evidence_whatever_the_answer(tmp_path, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    eos, pad = tok.info.eos_id, 0
    # The answer occurs early and late; the line the question quotes sits in the middle, out of reach of a
    # window around the answer's first occurrence.
    context = ("The king speaks. " + "The fool fights the storm. " * 40 + "The maid remembers a letter. "
               + "The fool fights the storm. " * 40 + "The king speaks again.")
    asked = QARecord(context, "Who remembers a letter?", "The king", evidence="The maid remembers a letter.")
    assert not context_fits(tok, asked, "cqa", SEQ)  # what megakv-eval counts: encode_record trims this one
    assert context_fits(tok, QARecord("The king speaks.", asked.question, asked.answer), "cqa", SEQ)
    for answer in ("The king", "The fool"):  # an answer-centred window would hold the context's start
        record = QARecord(asked.context, asked.question, answer, evidence=asked.evidence)
        tokens, mask = encode_record(tok, record, "cqa", SEQ, eos, pad)
        prompt = tok.decode(tokens[:np.flatnonzero(mask)[0]].tolist())
        assert "maid remembers a letter" in prompt and "king speaks" not in prompt
    tokens, mask = encode_record(tok, QARecord(context, asked.question, asked.answer), "cqa", SEQ, eos, pad)
    assert "maid remembers" not in tok.decode(tokens[:np.flatnonzero(mask)[0]].tolist())  # no evidence: the answer
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"context": context, "question": "q", "answer": "a", "evidence": "a lost line"}) + "\n")
    with pytest.raises(DataError, match="qa.jsonl:1: evidence 'a lost line' is not a span of its context"):
        read_qa_records(path)
    path.write_text(json.dumps({"context": context, "question": "q", "answer": "a",
                                "evidence": asked.evidence}) + "\n")
    assert read_qa_records(path)[0].evidence == asked.evidence


def test_the_window_holds_the_evidence_span_itself_or_the_record_is_refused(tokenizer_dir):
    """The window was centred on the first match ignoring case (an upper-case headline earlier in the context,
    or text whose lower case is longer, as 'İ', moved it off the evidence: neither evidence nor answer in the
    prompt, silently), and evidence longer than the room was cut silently."""
    tok = load_tokenizer(tokenizer_dir)
    eos, pad = tok.info.eos_id, 0
    evidence = "the king loves old Rome."
    filler = "The fool fights the storm. " * 40
    for opening in ("THE KING LOVES OLD ROME. ", "İ" * 400 + " "):
        record = QARecord(opening + filler + evidence + " " + filler, "What does the king love?", "old Rome",
                          evidence=evidence)
        tokens, mask = encode_record(tok, record, "cqa", SEQ, eos, pad)
        prompt = tok.decode(tokens[:np.flatnonzero(mask)[0]].tolist())
        assert evidence in prompt, opening[:10]
    too_long = QARecord(filler + "the king loves " + "old Rome and " * 60 + "the sea." + filler,
                        "What does the king love?", "the sea", evidence="the king loves " + "old Rome and " * 60)
    with pytest.raises(DataError, match="alone takes .* tokens, more than the .* left for the context"):
        encode_record(tok, too_long, "cqa", SEQ, eos, pad)


def test_prepared_samples_count_only_answer_tokens(tmp_path, qa_dataset, tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    cfg = load_config(None, [f"data.datasets=[{qa_dataset}]", f"data.seq_len={SEQ}", "model.vocab_size=320",
                             "model.max_seq_len=128", "data.valid_fraction=0.1", f"data.cache_dir={tmp_path / 'c'}"])
    data = build_data(cfg.data, cfg.seq_len, is_builder=True)
    answers = {r["answer"] for r in qa_records(200)}
    inputs, labels = micro_batches(data.train, 0, 8, 8, 0, 1)[0]
    assert inputs.shape == labels.shape == (8, SEQ) and inputs.min() >= 0
    for row_inputs, row_labels in zip(inputs, labels):
        counted = row_labels[row_labels != IGNORE].tolist()
        assert counted[-1] == tok.info.eos_id and tok.decode(counted[:-1]).strip() in answers
        # A label counts exactly where the input before it is the prompt's end or an answer token.
        positions = torch.nonzero(row_labels != IGNORE).flatten()
        assert tok.decode(row_inputs[:positions[0] + 1].tolist()).rstrip().endswith("Answer:")
        assert (positions == torch.arange(positions[0], positions[0] + len(positions))).all()
    meta = json.loads((qa_dataset.parent / "qa_train.meta.json").read_text())
    assert meta["sft"]["orders"]["qca"] + meta["sft"]["orders"]["cqa"] == 200
    assert 70 < meta["sft"]["orders"]["qca"] < 130

    wrong = load_config(None, [f"data.datasets=[{qa_dataset}]", "data.seq_len=32", "model.vocab_size=320",
                               "model.max_seq_len=128", f"data.cache_dir={tmp_path / 'c'}"])
    with pytest.raises(DataError, match=f"data.seq_len={SEQ}"):
        build_data(wrong.data, wrong.seq_len, is_builder=True)



def test_every_record_is_one_sample_and_a_single_held_out_record_validates(tmp_path, qa_dataset):
    """N records give N samples (none lost to the one-token overlap of windows), each exactly one record;
    the very last record's final label, past the end of the data, is a filler the loss ignores."""
    ds = IndexedDataset(qa_dataset)
    cfg = load_config(None, [f"data.datasets=[{qa_dataset}]", f"data.seq_len={SEQ}", "model.vocab_size=320",
                             "model.max_seq_len=128", "data.valid_fraction=0.005", f"data.cache_dir={tmp_path / 'c'}"])
    data = build_data(cfg.data, cfg.seq_len, is_builder=True)
    valid_set, = data.valid_sets.values()
    assert len(data.valid) == len(valid_set) == 1  # 0.005 x 200 rounds to one held-out record: one sample
    def record_of(sample):
        return tuple(np.where(sample < 0, -sample - 1, sample)[:SEQ].tolist())

    every_record = Counter(tuple(ds.get(i).tolist()) for i in range(len(ds)))  # (records may repeat)
    epoch_samples = [data.train[i] for i in range(199 * 2)]  # two epochs of the 199 training records
    for epoch in (epoch_samples[:199], epoch_samples[199:]):
        assert Counter(map(record_of, epoch)) + Counter([record_of(data.valid[0])]) == every_record
    last_labels = [int(s[-1]) for s in epoch_samples]
    assert sum(label == -1 for label in last_labels[:199]) == 1  # the filler: masked (negative), once an epoch
    inputs, labels = inputs_and_labels(torch.from_numpy(np.stack(epoch_samples[:199])))
    assert inputs.min() >= 0 and (labels[:, -1] == IGNORE).all()  # a record's last label is padding's or filler's


def test_a_validation_split_or_dataset_shorter_than_one_sample_is_refused(tmp_path):
    """Validation asked for but impossible is an error, not a run that silently validates on nothing."""
    prefix = prepare_tiny_dataset(tmp_path / "d")
    tokens = IndexedDataset(prefix)
    short, short_docs = tmp_path / "short", tmp_path / "short_docs"
    with IndexedWriter(short, tokens.dtype) as writer:
        writer.add_document(tokens.get(0, 0, 20))
        writer.finalize()
    with IndexedWriter(short_docs, tokens.dtype) as writer:  # 30 documents of 5 tokens
        for i in range(30):
            writer.add_document(tokens.get(i, 0, 5))
        writer.finalize()

    def data_with(*overrides):
        cfg = load_config(None, ["data.seq_len=64", f"data.tokenizer={prefix.parent / 'tokenizer'}",
                                 f"data.cache_dir={tmp_path / 'c'}", "validation.every=0", *overrides])
        return build_data(cfg.data, cfg.seq_len, is_builder=True)

    with pytest.raises(DataError, match=r"validation dataset \(data.valid_datasets\) .*short has 20 tokens in 1 "
                                        r"documents, fewer than one sample of seq_len \+ 1 = 65"):
        data_with(f"data.datasets=[{prefix}]", f"data.valid_datasets=[{short}]", "data.valid_fraction=0")
    with pytest.raises(DataError, match=r"validation.every=100 but the data holds no validation sample of seq_len "
                                        r"\+ 1 = 65 tokens \(held-out samples per dataset: short_docs: 0;"):
        data_with(f"data.datasets=[{short_docs}]", "data.valid_fraction=0.05").check_validation(100)
    data_with(f"data.datasets=[{short_docs}]", "data.valid_fraction=0.05").check_validation(0)  # not asked for
    # In a blend, a small dataset whose share holds no whole sample leaves validation to the others.
    blended = data_with(f"data.datasets=[{short_docs},{prefix}]", "data.valid_fraction=0.05")
    assert len(blended.valid) > 0 and len(blended.valid_sets["short_docs"]) == 0
    assert data_with(f"data.datasets=[{short_docs}]", "data.valid_fraction=0").valid is None


def test_loss_on_record_counts_every_record_token_but_not_the_padding(tmp_path, qa_dataset, tokenizer_dir, capsys):
    """megakv-qa prep --loss-on record: the same samples, a mask widened from the second token to the
    answer's end token; its labels are the answer-mask labels plus the prompt's, never padding, and never
    a record's first token (its only label position follows the previous record's padding)."""
    prefix = tmp_path / "out" / "qa_record"
    assert qa_main(["prep", "--input", str(qa_dataset.parent.parent / "qa.jsonl"), "--tokenizer", str(tokenizer_dir),
                    "--output-prefix", str(prefix), "--seq-len", str(SEQ), "--loss-on", "record"]) == 0
    printed = capsys.readouterr().out
    answer_only, whole = (IndexedDataset(mask_prefix(p)) for p in (qa_dataset, prefix))
    tokens_a, tokens_w = IndexedDataset(qa_dataset), IndexedDataset(prefix)
    assert len(whole) == len(answer_only) == 200
    counted = 0
    for i in range(200):
        assert tokens_w.get(i).tolist() == tokens_a.get(i).tolist()  # the same samples
        narrow, wide = answer_only.get(i), whole.get(i)
        end = int(np.flatnonzero(narrow)[-1])  # the answer's end token; padding follows
        assert not wide[0] and wide[1:end + 1].all() and not wide[end + 1:].any() and (wide >= narrow).all()
        counted += int(wide.sum())
    meta = json.loads(prefix.with_suffix(".meta.json").read_text())["sft"]
    assert meta["loss_on"] == "record" and meta["counted_tokens"] == counted > 3 * meta["answer_tokens"]
    assert f"{counted} tokens counted" in printed
    with pytest.raises(DataError, match="--loss-on 'prompt' is not one of answer, record"):
        prepare_sft(qa_dataset.parent.parent / "qa.jsonl", tokenizer_dir, tmp_path / "bad", SEQ, loss_on="prompt")


def test_masked_tokens_contribute_nothing_to_the_loss_or_its_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 10, 17, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 17, (3, 10))
    counted = torch.rand(3, 10) < 0.4
    counted[0, 0] = True
    masked_labels = torch.where(counted, labels, torch.full_like(labels, IGNORE))

    loss = causal_lm_loss(logits, masked_labels)  # computed in fp32, as in training
    reference = F.cross_entropy(logits[counted], labels[counted])  # fp64, the counted positions alone
    assert float(loss.detach()) == pytest.approx(float(reference.detach()), rel=1e-6)
    loss.backward()
    expected_grad, = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(logits.grad, expected_grad, rtol=1e-5, atol=1e-7)
    assert (logits.grad[~counted] == 0).all()  # nothing flows into positions whose label is masked
    assert (logits.grad[counted].abs().sum(-1) > 0).all()
    # Finite differences agree: moving a masked position's logits changes nothing, a counted one's does.
    with torch.no_grad():
        bumped = logits.detach().clone()
        masked_at = tuple(torch.nonzero(~counted)[0].tolist())
        bumped[masked_at] += 10.0
        assert float(causal_lm_loss(bumped, masked_labels)) == float(loss)
        counted_at = (0, 0, int(labels[0, 0]))
        step = 1e-3
        up, down = logits.detach().clone(), logits.detach().clone()
        up[counted_at] += step
        down[counted_at] -= step
        numeric = (float(causal_lm_loss(up, masked_labels)) - float(causal_lm_loss(down, masked_labels))) / (2 * step)
        assert numeric == pytest.approx(float(logits.grad[counted_at]), rel=2e-2)
    # Whatever the masked positions' true labels were, nothing changes.
    relabelled = torch.where(counted, labels, (labels + 5) % 17)
    again = causal_lm_loss(logits.detach(), torch.where(counted, relabelled, torch.full_like(labels, IGNORE)))
    assert float(again) == float(loss.detach())
    # A batch with nothing counted gives 0, not NaN (a NaN would count as a diverged step).
    assert float(causal_lm_loss(logits.detach(), torch.full_like(labels, IGNORE))) == 0.0
    # Validation is a mean over the counted labels of the weighted sequences (as megakv-eval's), not a mean
    # of per-sequence means: a sequence with few answer tokens does not weigh more.
    weights = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)  # the last: a weight-0 repeat (padding a rank)
    total = weighted_token_loss(logits.detach(), masked_labels, weights)
    tokens = weighted_label_count(masked_labels, weights)
    assert tokens == float(counted[:2].sum())
    kept = counted.clone()
    kept[2] = False
    assert float(total) / tokens == pytest.approx(float(F.cross_entropy(logits[kept], labels[kept])), rel=1e-6)
    # Given the step's counted labels per micro-batch, a micro-batch's loss is its sum over that figure.
    assert float(causal_lm_loss(logits.detach(), masked_labels, 2.5)) == pytest.approx(
        float(F.cross_entropy(logits[counted], labels[counted], reduction="sum")) / 2.5, rel=1e-6)


def test_inputs_and_labels_is_the_identity_split_for_plain_data():
    block = torch.arange(12).reshape(2, 6)
    inputs, labels = inputs_and_labels(block)
    assert torch.equal(inputs, block[:, :-1]) and torch.equal(labels, block[:, 1:])


def test_bad_records_are_refused_naming_the_line(tmp_path, tokenizer_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(qa_records(1)[0]) + "\n" + json.dumps({"context": "x", "question": "y"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing or empty string field\(s\) \['answer'\]"):
        prepare_sft(path, tokenizer_dir, tmp_path / "o" / "qa", SEQ)
    assert not (tmp_path / "o" / "qa.idx").exists()
    assert qa_main(["prep", "--input", str(path), "--tokenizer", str(tokenizer_dir), "--output-prefix",
                    str(tmp_path / "o" / "qa")]) == 2


def test_a_record_nested_too_deeply_is_refused_naming_the_line(tmp_path, tokenizer_dir, capsys):
    """200,000 '[' in a record: a RecursionError traceback from json (security audit)."""
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(qa_records(1)[0]) + "\n" + '{"context": ' + "[" * 200_000 + "\n")
    assert qa_main(["prep", "--input", str(path), "--tokenizer", str(tokenizer_dir), "--output-prefix",
                    str(tmp_path / "o" / "qa")]) == 2
    err = capsys.readouterr().err
    assert f"error: {path}:2: JSON nested too deeply to read (not a QA record). Fix:" in err and "Traceback" not in err
    assert not (tmp_path / "o" / "qa.idx").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_masked_loss_is_the_mean_over_the_steps_answer_tokens_whatever_the_micro_batch(tmp_path, qa_dataset):
    """Averaging per-micro-batch means let a micro-batch with few answer tokens weigh more, so the loss and the
    gradient changed with train.micro_batch (step 1: 5.7801 at 2 vs 5.7687 at 8). Now each micro-batch's sum is
    divided by the step's counted tokens per micro-batch: one process at micro-batch 8 or 2 and two processes
    at 2 (data, pipeline or tensor parallel) train alike, and step 1 equals the mean over the step's answer
    tokens computed here."""
    from train_helpers import TINY_RECIPE, launch_train, read_metrics, step_losses

    from megakv.parallel.wrap import build_model
    from megakv.train.export import consolidated_state_dict

    common = [f"data.datasets=[{qa_dataset}]", f"data.seq_len={SEQ}", "model.max_seq_len=128",
              "routing.strategy=none", "train.steps=3", "train.global_batch=8", "data.valid_fraction=0.1",
              "validation.every=3", "validation.samples=12", "validation.plans=[every:1]", "checkpoint.every=3",
              "logging.tensorboard=false", f"data.cache_dir={tmp_path / 'cache'}", "parallel.zero_stage=1"]
    runs = {"mb8": (1, ["train.micro_batch=8"]), "mb2": (1, ["train.micro_batch=2"]),
            "dp2": (2, ["train.micro_batch=2"]), "pp2": (2, ["train.micro_batch=2", "parallel.pipeline=2"]),
            "tp2": (2, ["train.micro_batch=2", "parallel.tensor=2"])}
    for name, (nproc, extra) in runs.items():
        run = launch_train([*common, *extra, f"train.run_dir={tmp_path / name}"], nproc=nproc)
        assert run.ok, run.output[-4000:]
    losses = {name: step_losses(tmp_path / name) for name in runs}
    norms = {name: {r["step"]: r["train/grad_norm"] for r in read_metrics(tmp_path / name) if "loss_exact" in r}
             for name in runs}
    for name in ("mb2", "dp2", "pp2", "tp2"):
        for step in (1, 2, 3):
            assert losses[name][step] == pytest.approx(losses["mb8"][step], rel=1e-6), (name, step)
            assert norms[name][step] == pytest.approx(norms["mb8"][step], rel=1e-5), (name, step)

    cfg = load_config(TINY_RECIPE, [*common, "train.micro_batch=8"])
    data = build_data(cfg.data, cfg.seq_len, is_builder=True)
    (inputs, labels), = micro_batches(data.train, 0, 8, 8, 0, 1)
    per_sample = (labels != IGNORE).sum(dim=1)
    assert per_sample.min() < per_sample.max()  # answers of different lengths: the case that was wrong
    with torch.no_grad():
        logits = build_model(cfg.model, cfg.train.seed)(inputs)
    counted = labels != IGNORE
    expected = F.cross_entropy(logits[counted].double(), labels[counted])
    assert losses["mb8"][1] == pytest.approx(float(expected), rel=1e-5)

    # Validation is the mean over the held-out answer tokens too (it was a mean of per-sample means).
    _, weights, _ = consolidated_state_dict(tmp_path / "mb2")
    model = build_model(cfg.model, cfg.train.seed)
    model.load_state_dict(weights)
    assert len(data.valid) > 12  # validation.samples=12: the first 12 held-out samples
    rows = torch.from_numpy(np.stack([np.asarray(data.valid[i], dtype=np.int64) for i in range(12)]))
    valid_inputs, valid_labels = inputs_and_labels(rows)
    with torch.no_grad():
        valid_logits = model(valid_inputs)
    kept = valid_labels != IGNORE
    reference = float(F.cross_entropy(valid_logits[kept].double(), valid_labels[kept]))
    for name in runs:
        logged, = [r["valid/loss_every1"] for r in read_metrics(tmp_path / name) if "valid/loss_every1" in r]
        assert logged == pytest.approx(reference, rel=1e-5), name


def test_qa_prep_strips_a_utf8_bom_and_names_a_lone_surrogate(tmp_path, tokenizer_dir, capsys):
    """megakv-qa prep refused a UTF-8 BOM that megakv-prep strips, and a record holding a JSON "\\ud800" escape
    (a lone surrogate) was a RuntimeError traceback from the tokenizer."""
    records = qa_records(3)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in records).encode())
    assert [r.context for r in read_qa_records(bom)] == [r["context"] for r in records]
    assert qa_main(["prep", "--input", str(bom), "--tokenizer", str(tokenizer_dir), "--output-prefix",
                    str(tmp_path / "out" / "bom"), "--seq-len", str(SEQ)]) == 0
    assert len(IndexedDataset(tmp_path / "out" / "bom")) == 3
    surrogate = tmp_path / "surrogate.jsonl"
    lines = [json.dumps(r) for r in records]
    lines[1] = lines[1].replace('"answer": "', '"answer": "\\ud800 ')
    surrogate.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"surrogate\.jsonl:2: field 'answer' holds an unpaired surrogate at "
                                        r"character 0"):
        read_qa_records(surrogate)
    assert qa_main(["prep", "--input", str(surrogate), "--tokenizer", str(tokenizer_dir), "--output-prefix",
                    str(tmp_path / "out" / "surrogate"), "--seq-len", str(SEQ)]) == 2
    err = capsys.readouterr().err
    assert "surrogate.jsonl:2: field 'answer'" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "surrogate.idx").exists()


def test_resume_refuses_records_prepared_again_with_other_loss_masks(tmp_path, qa_dataset, tokenizer_dir):
    """--loss-on answer and --loss-on record give byte-identical tokens: only the mask tells the runs apart,
    so a checkpoint of one must not resume on the other (the sample order, and so `fingerprint`, is equal)."""
    prefix = tmp_path / "out" / "qa"
    prep = ["prep", "--input", str(qa_dataset.parent.parent / "qa.jsonl"), "--tokenizer", str(tokenizer_dir),
            "--output-prefix", str(prefix), "--seq-len", str(SEQ)]
    cfg = load_config(None, [f"data.datasets=[{prefix}]", f"data.seq_len={SEQ}", "model.vocab_size=320",
                             "model.max_seq_len=128", f"data.cache_dir={tmp_path / 'c'}"])
    assert qa_main(prep) == 0
    answer_only = build_data(cfg.data, cfg.seq_len, is_builder=True)
    saved = answer_only.resume_state(40)
    assert qa_main([*prep, "--loss-on", "record", "--overwrite"]) == 0
    whole_record = build_data(cfg.data, cfg.seq_len, is_builder=True)
    assert whole_record.fingerprint == answer_only.fingerprint  # the same samples in the same order
    assert whole_record.loss_mask_fingerprint not in ("", answer_only.loss_mask_fingerprint)
    with pytest.raises(DataError, match="trained with other loss masks"):
        whole_record.check_resume(saved)
    assert whole_record.check_resume({**saved, "loss_mask_fingerprint": ""}) == 40  # written before masks counted
    assert whole_record.check_resume(whole_record.resume_state(40)) == 40


def test_megakv_train_refuses_to_resume_on_records_prepared_with_other_loss_masks(tmp_path, qa_dataset, tokenizer_dir):
    """The same check at launch: the checkpoint records its masks, the resumed run sees others, exit 2."""
    from train_helpers import launch_train, step_losses

    prefix = tmp_path / "out" / "qa"
    prep = ["prep", "--input", str(qa_dataset.parent.parent / "qa.jsonl"), "--tokenizer", str(tokenizer_dir),
            "--output-prefix", str(prefix), "--seq-len", str(SEQ)]
    assert qa_main(prep) == 0
    run = [f"data.datasets=[{prefix}]", f"data.seq_len={SEQ}", "model.max_seq_len=128", "train.global_batch=4",
           "train.micro_batch=4", "train.steps=3", "validation.every=0", "logging.tensorboard=false",
           f"train.run_dir={tmp_path / 'run'}"]
    first = launch_train([*run, "train.debug.sigterm_at_step=1"], nproc=1)  # checkpoints step 1, stops
    assert first.ok, first.output[-4000:]
    assert qa_main([*prep, "--loss-on", "record", "--overwrite"]) == 0
    from train_helpers import TINY_RECIPE

    from megakv.cli.train import main as train_main

    assert train_main([str(TINY_RECIPE), *run, "--resume", "auto", "--dry-run"]) == 2  # caught before launch too
    resumed = launch_train(run, nproc=1, resume=True)
    assert resumed.returncodes == [2], resumed.output[-4000:]
    assert "trained with other loss masks" in resumed.output and "--loss-on" in resumed.output
    assert sorted(step_losses(tmp_path / "run")) == [1]  # nothing trained on the other masks


def test_dry_run_refuses_qa_records_prepared_for_other_windows(tmp_path, qa_dataset, capsys):
    """--dry-run approved data.seq_len=64 on records prepared as 128-token samples; the launch then refused them
    after starting the process group."""
    from train_helpers import TINY_RECIPE

    from megakv.cli.train import main as train_main

    base = [str(TINY_RECIPE), f"data.datasets=[{qa_dataset}]", "model.max_seq_len=128",
            f"train.run_dir={tmp_path / 'run'}", "--dry-run"]
    assert train_main([*base, "data.seq_len=64"]) == 2
    err = capsys.readouterr().err
    assert "data.seq_len" in err and "prepared as 128-token samples" in err and "--seq-len 64" in err
    assert train_main([*base, f"data.seq_len={SEQ}"]) == 0
