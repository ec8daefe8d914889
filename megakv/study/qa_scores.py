"""The study's QA scores of one model at every retention: greedy answers (exact match, token F1), the loss of
the answer tokens and of all the record's tokens, from one batched teacher-forced pass per plan."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from megakv.data.sft import read_qa_records
from megakv.eval.qa import evenly_spaced
from megakv.study.runs import model_fingerprint
from megakv.train.run_dir import write_json_atomically

# Bumped when answers are scored differently, so cached scores are not mixed with new ones (2: a prediction
# keeps the reference's line count, every config end id stops an answer, the window sits on the evidence).
SCORING_VERSION = 2

Log = Callable[[str], None]
RETAINS = ("every:1", "every:2", "every:3", "every:4")


@torch.no_grad()
def score_plans(model, tokenizer, records: Sequence, retains: Sequence[str], *, seq_len: int, max_new_tokens: int,
                batch: int = 8) -> dict[str, dict[str, float]]:
    """{retain: {exact_match, f1, answer_loss, heldout_loss}} on the same records and prompts
    (max_new_tokens 0: no answers are generated, only the two losses).

    The scores of megakv.eval.qa.evaluate_qa (greedy answers of the C->Q->A training prompt, EM and F1,
    loss of the reference answer tokens), plus the loss of all the record's tokens (context, question
    and answer: the held-out loss), with one batched teacher-forced pass per plan for both losses.
    """
    from megakv.data.sft import encode_record
    from megakv.eval.qa import (
        exact_match,
        greedy_answers,
        padding_id,
        predicted_answer,
        require_answer_budget,
        stop_ids_of,
        token_f1,
    )
    from megakv.routing import deployment_plan

    info = tokenizer.info
    pad_id = padding_id(tokenizer, model)
    stop = stop_ids_of(tokenizer, model, pad_id)
    encoded = [encode_record(tokenizer, r, "cqa", seq_len, info.eos_id, pad_id, info.bos_id) for r in records]
    device = model.embed.weight.device
    tokens = torch.as_tensor(np.stack([t for t, _ in encoded]), device=device)
    answer = torch.as_tensor(np.stack([m for _, m in encoded]), device=device).bool()
    ends = answer.int().cumsum(1).argmax(1) + 1  # one past each record's last answer token (its end token)
    record = torch.arange(seq_len, device=device)[None, :] < ends[:, None]
    prompts = [t[:int(np.flatnonzero(m)[0])].tolist() for t, m in encoded]
    if max_new_tokens:
        require_answer_budget([m for _, m in encoded], max_new_tokens)
    # Labels are tokens[:, 1:]; label j counts for the answer loss if mask[j + 1], for the record loss if
    # token j + 1 belongs to the record (not padding).
    answer_labels, record_labels = answer[:, 1:], record[:, 1:]
    scores = {}
    for spec in retains:
        plan = deployment_plan(spec, model.cfg.n_layers)
        answer_sum = record_sum = 0.0
        for first in range(0, len(records), batch):
            rows = slice(first, first + batch)
            logits = model(tokens[rows, :-1], plan=plan).float()
            losses = F.cross_entropy(logits.transpose(1, 2), tokens[rows, 1:], reduction="none")
            answer_sum += float(losses[answer_labels[rows]].sum())
            record_sum += float(losses[record_labels[rows]].sum())
        scores[spec] = {"answer_loss": answer_sum / max(1, int(answer_labels.sum())),
                        "heldout_loss": record_sum / max(1, int(record_labels.sum()))}
        if max_new_tokens == 0:
            continue
        answers = greedy_answers(model, prompts, plan, max_new_tokens, stop, info.vocab_size, batch, info.eos_id,
                                 pad_id)
        predicted = [predicted_answer(tokenizer.decode(a), r.answer) for a, r in zip(answers, records)]
        n = max(1, len(records))
        scores[spec] = {"exact_match": sum(exact_match(p, r.answer) for p, r in zip(predicted, records)) / n,
                        "f1": sum(token_f1(p, r.answer) for p, r in zip(predicted, records)) / n,
                        **scores[spec],
                        "examples": [{"question": r.question, "answer": r.answer, "predicted": p}
                                     for p, r in list(zip(predicted, records))[:3]]}
    return scores


def chance_scores(test_records: Path, records: int, kind: str) -> dict[str, float]:
    """Expected exact match and F1 of a uniform guess of the answer's form (megakv.data.qa_build.guesses: a
    speaker of the passage, or another line of it), on the records `evaluate_model` scores: what a model
    that learned only the form gets."""
    from megakv.data.qa_build import guesses
    from megakv.eval.qa import exact_match, token_f1

    chosen = evenly_spaced(read_qa_records(test_records), records)  # read_qa_records refuses an empty file
    options = [guesses(kind, r.context, r.evidence or "") for r in chosen]
    return {metric: float(np.mean([np.mean([score(guess, r.answer) for guess in guessed]) if guessed else 0.0
                                   for r, guessed in zip(chosen, options)]))
            for metric, score in (("exact_match", exact_match), ("f1", token_f1))}


def evaluate_model(name: str, model_path: Path, test_records: Path, eval_dir: Path, log: Log, *, records: int,
                   seq_len: int, max_new_tokens: int, device: str = "cpu") -> dict[str, dict[str, float]]:
    """`score_plans` of one model on `records` held-out records spread evenly over the file (cached in
    eval_dir/NAME.json, keyed by the model's fingerprint and these settings). max_new_tokens 0: the losses only."""
    from megakv.config.devices import resolve_device
    from megakv.data.tokenizer import load_tokenizer
    from megakv.model_paths import resolve_model

    path = eval_dir / f"{name}.json"
    key = {"model": str(model_path.resolve()), "fingerprint": model_fingerprint(model_path),
           "test_records": hashlib.sha256(Path(test_records).read_bytes()).hexdigest()[:16],
           "records": records, "chosen": "evenly spaced", "seq_len": seq_len, "max_new_tokens": max_new_tokens,
           "scoring": SCORING_VERSION}
    if path.is_file():
        cached = json.loads(path.read_text())
        if cached.get("key") == key:
            return cached["scores"]
    started = time.perf_counter()
    model, tokenizer_dir = resolve_model(model_path, resolve_device(device))
    model.eval()
    chosen = evenly_spaced(read_qa_records(test_records), records)
    log(f"evaluating {name}: {len(chosen)} held-out QA records at {' '.join(RETAINS)}")
    tokenizer = load_tokenizer(tokenizer_dir, model.cfg.eos_token_ids)
    scores = score_plans(model, tokenizer, chosen, RETAINS, seq_len=seq_len, max_new_tokens=max_new_tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomically(path, {"key": key, "scores": scores, "seconds": time.perf_counter() - started})
    log(f"evaluated {name} in {time.perf_counter() - started:.0f} s")
    return scores
