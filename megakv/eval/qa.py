"""Extractive QA at every retention plan: greedy answers scored by exact match and token F1 (SQuAD's
normalisation: lower case, no punctuation, no articles a/an/the, single spaces), next to the held-out
loss on the reference answer tokens (the fine-tuning loss, measured under the same plan).

The prompt is built exactly as for training (megakv/data/sft.py), in one fixed order (C->Q->A by
default), so the scores of different plans and models are comparable.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from megakv.data.sft import QARecord, encode_record
from megakv.data.tokenizer import Tokenizer
from megakv.routing import RoutingPlan

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)

MAX_NEW_TOKENS = 32  # the longest greedy answer
ORDER = "cqa"  # prompts put the context first (data/sft.py ORDERS)


def evenly_spaced(items: Sequence, count: int) -> list:
    """`count` items spread evenly over `items` (all of them when there are fewer).

    A QA file built from several documents (megakv-qa build's test plays) lists one document after
    another, and neighbouring records share passages: its first N records would all come from one
    document and overlap each other.
    """
    if count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """Harmonic mean of token precision and recall after normalisation (both empty: 1, one empty: 0)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def answer_before_stop(tokens: Sequence[int], stop_ids: set[int], vocab_size: int | None) -> list[int]:
    out = []
    for token in tokens:
        if token in stop_ids or (vocab_size is not None and token >= vocab_size):
            break
        out.append(token)
    return out


@torch.no_grad()
def greedy_answers(model, prompts: Sequence[list[int]], plan: RoutingPlan, max_new_tokens: int, stop_ids: set[int],
                   vocab_size: int | None = None, batch_size: int = 8, eos_id: int | None = None,
                   pad_id: int = 0) -> list[list[int]]:
    """Greedy continuations of `prompts` under `plan` through the inference engine (a cache for the retained
    layers only, prompts left-padded into batches); a stop id, or an id outside the tokenizer's `vocab_size`
    (a model's embedding table is often padded beyond it), ends an answer."""
    from megakv.inference.engine import InferenceEngine

    engine = InferenceEngine(model, plan)
    out = []
    for first in range(0, len(prompts), batch_size):
        generated = engine.generate(prompts[first:first + batch_size], max_new_tokens, eos_id=eos_id,
                                    pad_id=pad_id)
        out += [answer_before_stop(tokens, stop_ids, vocab_size) for tokens in generated.tokens]
    return out


def predicted_answer(generated: str, reference: str) -> str:
    """The answer in a greedy continuation: as many lines as the reference answer has (one for the usual
    one-line answer). A model that has not learnt to end its answer with the end token runs on past it, and
    only the line count of the reference, never its text, says where to cut."""
    lines = generated.strip().split("\n")
    return "\n".join(lines[:reference.strip().count("\n") + 1]).strip()


def padding_id(tokenizer: Tokenizer, model) -> int:
    """The id QA batches are padded with: the tokenizer's pad (else its end token) when the model's embedding
    has it, else 0. Padded positions are masked, so any id the embedding has will do (an added [PAD] may not)."""
    info = tokenizer.info
    candidates = (info.pad_id, info.eos_id)
    return next((i for i in candidates if i is not None and 0 <= i < model.cfg.vocab_size), 0)


def stop_ids_of(tokenizer: Tokenizer, model, pad_id: int | None) -> set[int]:
    """Ids that end a greedy answer: the tokenizer's end token, the padding id, and every end id of the model's
    config (an instruct model's end-of-turn token, which transformers' generate stops at too)."""
    return {tokenizer.info.eos_id, *model.cfg.eos_token_ids} | ({pad_id} if pad_id is not None else set())


@dataclass
class QAResult:
    spec: str
    exact_match: float
    f1: float
    answer_loss: float  # mean cross-entropy over reference answer tokens (+ end token)
    records: int
    examples: list[dict]

    def as_dict(self) -> dict:
        return {"retain": self.spec, "exact_match": self.exact_match, "f1": self.f1,
                "answer_loss": self.answer_loss, "records": self.records, "examples": self.examples}


def require_answer_budget(masks: Sequence, max_new_tokens: int) -> None:
    """Refuse a greedy budget shorter than the longest reference answer (masks: the records' answer masks,
    whose last counted token is the end token): a truncated answer loses F1 the model earned."""
    longest = max((int(m.sum()) - 1 for m in masks), default=0)
    if max_new_tokens < longest:
        raise ValueError(f"max_new_tokens {max_new_tokens} is shorter than the longest reference answer "
                         f"({longest} tokens): raise it (megakv-eval --max-new-tokens)")


@torch.no_grad()
def evaluate_qa(model, tokenizer: Tokenizer, records: Sequence[QARecord], plans: dict[str, RoutingPlan], *,
                seq_len: int, max_new_tokens: int = MAX_NEW_TOKENS, order: str = ORDER, keep_examples: int = 3,
                batch_size: int = 8, progress=None) -> list[QAResult]:
    """EM, F1 and answer loss of every plan on the same records and prompts."""
    info = tokenizer.info
    pad_id = padding_id(tokenizer, model)
    stop = stop_ids_of(tokenizer, model, pad_id)
    device = model.embed.weight.device
    prompts, teacher = [], []
    for record in records:
        tokens, mask = encode_record(tokenizer, record, order, seq_len, info.eos_id, pad_id, info.bos_id)
        counted = mask.nonzero()[0]
        end = int(counted[-1]) + 1
        prompts.append(tokens[:int(counted[0])].tolist())  # the training prompt, context window included
        teacher.append((torch.tensor(tokens[:end], device=device), torch.tensor(mask[:end], device=device)))
    require_answer_budget([mask for _, mask in teacher], max_new_tokens)
    results = []
    for spec, plan in plans.items():
        em = f1 = loss_sum = 0.0
        tokens_counted = 0
        examples = []
        answers = greedy_answers(model, prompts, plan, max_new_tokens, stop, info.vocab_size, batch_size,
                                 info.eos_id, pad_id)
        for record, answer, (tokens, mask) in zip(records, answers, teacher):
            predicted = predicted_answer(tokenizer.decode(answer), record.answer)
            em += exact_match(predicted, record.answer)
            f1 += token_f1(predicted, record.answer)
            logits = model(tokens[None, :-1], plan=plan)[0].float()
            counted = mask[1:].bool()
            loss_sum += float(F.cross_entropy(logits[counted], tokens[1:][counted], reduction="sum"))
            tokens_counted += int(counted.sum())
            if len(examples) < keep_examples:
                examples.append({"id": record.id, "question": record.question, "answer": record.answer,
                                 "predicted": predicted})
            if progress is not None:
                progress(1)
        n = max(1, len(records))
        results.append(QAResult(spec, em / n, f1 / n, loss_sum / max(1, tokens_counted), len(records), examples))
    return results


def format_qa_table(results: Sequence[QAResult]) -> str:
    header = f"{'retain':<12} {'EM':>7} {'F1':>7} {'answer loss':>12} {'records':>8}"
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{r.spec:<12} {r.exact_match:>7.3f} {r.f1:>7.3f} {r.answer_loss:>12.4f} {r.records:>8}")
    return "\n".join(lines)
