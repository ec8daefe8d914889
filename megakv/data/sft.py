"""Supervised (context, question, answer) data: prompts, the paper's order augmentation, and a loss mask.

One jsonl record -> one document of exactly `seq_len` tokens: the prompt (question and context in a random
order), then the answer and an end-of-document token, then padding. Only the answer and its end token
count in the loss. Because every document is exactly seq_len tokens long, the ordinary packed windows of
megakv/data/samples.py (seq_len + 1 tokens, overlapping by one) each hold one whole record, whatever the
shuffle: the window's extra last token is the next record's first prompt token, which never counts.

The loss mask lives in a parallel indexed pair `PREFIX_lossmask.bin/.idx` (uint8 0/1, the same document
lengths), written before the token pair, whose `.idx` is renamed last. In a loaded sample a token whose
label does not count is stored as -(id + 1); `inputs_and_labels` turns a block of samples back into
inputs and labels with IGNORE (-100, cross-entropy's ignore_index) where the label does not count, so
the training loss (megakv/parallel/runners.py: mean over counted labels) sees answer tokens only.
Data without a mask pair is unchanged (no negative ids), so the same function serves every dataset.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megakv.data.documents import unpaired_surrogate
from megakv.data.errors import DataError
from megakv.data.indexed import IndexedDataset, IndexedWriter, mask_prefix, optimal_dtype, pair_exists
from megakv.data.metadata import write_meta
from megakv.data.output_lock import output_lock
from megakv.data.sources import UTF8_BOM
from megakv.data.tokenizer import Tokenizer, load_tokenizer, save_beside_data
from megakv.json_input import TOO_DEEP, parse_json

if TYPE_CHECKING:
    import torch

IGNORE = -100  # torch.nn.functional.cross_entropy's default ignore_index
ORDERS = ("qca", "cqa")  # question -> context -> answer, or context -> question -> answer
FIELDS = ("context", "question", "answer")
LOSS_ON = ("answer", "record")  # what the loss mask counts (prepare_sft); the first is the default
SEED = 1234  # of the order augmentation
P_QUESTION_FIRST = 0.5  # the paper's: half the records Q->C->A, half C->Q->A
# Tokens per sample (megakv-qa prep) and per evaluation prompt (megakv-eval --task qa) unless --seq-len says
# otherwise: evaluate at the length the records were prepared at, and the prompts are the training ones.
QA_SEQ_LEN = 256


@dataclass(frozen=True)
class QARecord:
    context: str
    question: str
    answer: str
    id: str = ""
    # A span of the context the answer rests on (optional). A context too long for the sample is trimmed to
    # a window around it; without it, around the answer, which at evaluation means the reference answer
    # chooses what the model sees. Held-out sets should give it.
    evidence: str = ""


def read_qa_records(path: str | Path) -> list[QARecord]:
    """Records of a jsonl file with string fields context, question, answer (optional: id, evidence)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"QA file {path} not found", "pass a jsonl file with context, question and answer fields")
    records = []
    with path.open("rb") as f:
        for line_no, raw_line in enumerate(f, 1):
            if line_no == 1 and raw_line.startswith(UTF8_BOM):  # as megakv-prep: a BOM is no part of the text
                raw_line = raw_line[len(UTF8_BOM):]
            try:
                line = raw_line.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: not UTF-8 ({e.reason} at byte {e.start})",
                                "save the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                raw = parse_json(line)
            except ValueError as e:
                if str(e) == TOO_DEEP:
                    raise DataError(f"{path}:{line_no}: {TOO_DEEP} (not a QA record)",
                                    "one flat JSON object per line with context, question and answer") from None
                raise DataError(f"{path}:{line_no}: not valid JSON ({e})", "one JSON object per line") from None
            missing = [k for k in FIELDS if not isinstance(raw.get(k) if isinstance(raw, dict) else None, str)
                       or not raw[k].strip()]
            if missing:
                raise DataError(f"{path}:{line_no}: missing or empty string field(s) {missing}",
                                f"give every record non-empty string fields {list(FIELDS)}")
            _refuse_surrogates(raw, path, line_no)
            evidence = raw.get("evidence", "")
            if not isinstance(evidence, str) or (evidence and evidence not in raw["context"]):
                raise DataError(f"{path}:{line_no}: evidence {str(evidence)[:60]!r} is not a span of its context",
                                "give evidence as text copied from the context, or leave the field out")
            records.append(QARecord(raw["context"], raw["question"], raw["answer"], str(raw.get("id", line_no)),
                                    evidence))
    if not records:
        raise DataError(f"{path} holds no records", "pass a jsonl file with at least one QA record")
    return records


def _refuse_surrogates(raw: dict, path: Path, line_no: int) -> None:
    """A lone surrogate (a JSON "\\ud800" escape) reached the tokenizer as a RuntimeError traceback."""
    for key in (*FIELDS, "evidence", "id"):
        value = raw.get(key)
        at = unpaired_surrogate(value) if isinstance(value, str) else None
        if at is not None:
            raise DataError(f"{path}:{line_no}: field {key!r} holds an unpaired surrogate at character {at} (a "
                            "JSON \\ud800-style escape without its pair), which is not valid Unicode",
                            "fix or remove that record: escape whole characters only (e.g. \\ud83d\\ude00)")


def choose_orders(count: int, seed: int, p_question_first: float = P_QUESTION_FIRST) -> list[str]:
    """The paper's augmentation: each record is Q->C->A with probability p, else C->Q->A (seeded)."""
    draws = np.random.RandomState(seed).random_sample(count)
    return [ORDERS[0] if u < p_question_first else ORDERS[1] for u in draws]


def prompt_pieces(record: QARecord, order: str) -> tuple[str, str, str]:
    """(text before the context, the context, text after it): the context is the part trimmed to fit."""
    if order == "qca":
        return f"Question: {record.question}\nContext: ", record.context, "\nAnswer:"
    if order == "cqa":
        return "Context: ", record.context, f"\nQuestion: {record.question}\nAnswer:"
    raise ValueError(f"unknown order {order!r}, expected one of {ORDERS}")


def _focus_span(context: str, focus: str) -> tuple[int, int] | None:
    """Where `focus` lies in the context: its first exact occurrence (as read_qa_records checks evidence), else
    the first ignoring case (an answer may differ in case from the text); None when it is not there."""
    focus = focus.strip()
    if not focus:
        return None
    at = context.find(focus)
    if at < 0 and len(context.lower()) == len(context):  # lower() keeps character positions (not so for 'İ')
        at = context.lower().find(focus.lower())
    return (at, at + len(focus)) if at >= 0 else None


def _fit_context(tokenizer: Tokenizer, context: str, room: int, focus: str, record_id: str = "",
                 required: bool = False) -> list[int]:
    """At most `room` tokens of the context; when it is longer, a character window around `focus` (the
    evidence, else the answer; else the context's start), shrunk until it fits but never below the focus
    itself. A `required` focus (the evidence) that cannot fit whole is refused; another is cut to the room."""
    ids = tokenizer.encode(context)
    if len(ids) <= room:
        return ids
    span = _focus_span(context, focus)
    centre = (span[0] + span[1]) // 2 if span is not None else 0
    narrowest = span[1] - span[0] if span is not None else 1
    width = max(narrowest, int(room * len(context) / len(ids)))
    while True:
        first = max(0, min(centre - width // 2, len(context) - width))
        ids = tokenizer.encode(context[first:first + width])
        if len(ids) <= room or width == narrowest:
            break
        width = max(narrowest, int(width * 0.9))
    if len(ids) > room and required and span is not None:
        raise DataError(f"record {record_id!r}: its evidence {focus.strip()[:60]!r} alone takes {len(ids)} tokens, "
                        f"more than the {room} left for the context", "raise --seq-len, or shorten the evidence")
    return ids[:room]


def _framed(tokenizer: Tokenizer, record: QARecord, order: str, budget: int,
            bos_id: int | None) -> tuple[list[int], str, list[int], int]:
    """(ids before the context, the context, ids after it, tokens of `budget` left for the context)."""
    before, context, after = prompt_pieces(record, order)
    head = ([bos_id] if bos_id is not None else []) + tokenizer.encode(before)
    tail = tokenizer.encode(after)
    room = budget - len(head) - len(tail)
    if room < 1:
        raise DataError(f"record {record.id!r}: the question and template take {len(head) + len(tail)} tokens, "
                        f"leaving no room for the context in {budget}", "raise --seq-len or shorten the question")
    return head, context, tail, room


def encode_prompt(tokenizer: Tokenizer, record: QARecord, order: str, budget: int, focus: str = "",
                  bos_id: int | None = None) -> list[int]:
    """Prompt ids of at most `budget` tokens (the context trimmed to fit around `focus`); the same for
    training and eval."""
    head, context, tail, room = _framed(tokenizer, record, order, budget, bos_id)
    return head + _fit_context(tokenizer, context, room, focus, record.id,
                               required=bool(record.evidence) and focus == record.evidence) + tail


def _prompt_budget(tokenizer: Tokenizer, record: QARecord, seq_len: int) -> int:
    """Tokens of a seq_len sample left for the prompt: the answer and its end token come after it."""
    return seq_len - len(answer_ids_of(tokenizer, record.answer)) - 1


def context_fits(tokenizer: Tokenizer, record: QARecord, order: str, seq_len: int, bos_id: int | None = None) -> bool:
    """Whether encode_record keeps the record's whole context (else it trims it to a window)."""
    _, context, _, room = _framed(tokenizer, record, order, _prompt_budget(tokenizer, record, seq_len), bos_id)
    return len(tokenizer.encode(context)) <= room


def answer_ids_of(tokenizer: Tokenizer, answer: str) -> list[int]:
    return tokenizer.encode(" " + answer.strip())


def encode_record(tokenizer: Tokenizer, record: QARecord, order: str, seq_len: int, eos_id: int, pad_id: int,
                  bos_id: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens, mask), each exactly seq_len long: prompt (mask 0), answer + eos (mask 1), padding (mask 0)."""
    answer = answer_ids_of(tokenizer, record.answer) + [eos_id]
    if len(answer) >= seq_len // 2:
        raise DataError(f"record {record.id!r}: the answer takes {len(answer)} tokens of seq_len {seq_len}",
                        "raise --seq-len, or drop records with long answers")
    prompt = encode_prompt(tokenizer, record, order, _prompt_budget(tokenizer, record, seq_len),
                           record.evidence or record.answer, bos_id)
    ids = prompt + answer
    tokens = np.full(seq_len, pad_id, np.int64)
    mask = np.zeros(seq_len, np.uint8)
    tokens[:len(ids)] = ids
    mask[len(prompt):len(ids)] = 1
    return tokens, mask


@dataclass
class SFTSummary:
    prefix: str
    records: int
    orders: dict[str, int]
    answer_tokens: int
    seconds: float
    counted_tokens: int = 0  # tokens the loss counts: the answer tokens, or every record token (loss_on record)


def prepare_sft(records_path: str | Path, tokenizer_dir: str | Path, output_prefix: str | Path, seq_len: int, *,
                seed: int = SEED, p_question_first: float = P_QUESTION_FIRST, overwrite: bool = False,
                loss_on: str = LOSS_ON[0]) -> SFTSummary:
    """Write `output_prefix`.bin/.idx (+ .meta.json) and its `_lossmask` pair from a QA jsonl file.

    loss_on "answer" (the paper): only the answer and its end token count; "record": every token of the
    record counts (context, question, answer, end token; never the padding), ~20-25x the training signal per
    sample, for short budgets (megakv-study's fine-tuning part).
    """
    started = time.time()
    if loss_on not in LOSS_ON:
        raise DataError(f"--loss-on {loss_on!r} is not one of {', '.join(LOSS_ON)}",
                        "answer (the paper: only the answer tokens count) or record (every record token)")
    if seq_len < 8:
        raise DataError(f"--seq-len {seq_len} is too short for a prompt and an answer", "e.g. 256")
    if not 0.0 <= p_question_first <= 1.0:
        raise DataError(f"--p-question-first {p_question_first} is outside [0, 1]", "the paper uses 0.5")
    with output_lock(output_prefix, "megakv-qa prep"):  # a second writer of the prefix is refused, not raced
        return _prepare_sft(records_path, tokenizer_dir, Path(output_prefix), seq_len, seed, p_question_first,
                            overwrite, loss_on, started)


def _prepare_sft(records_path: str | Path, tokenizer_dir: str | Path, prefix: Path, seq_len: int, seed: int,
                 p_question_first: float, overwrite: bool, loss_on: str, started: float) -> SFTSummary:
    if pair_exists(prefix) and not overwrite:
        raise DataError(f"{prefix}.idx already exists", "choose another --output-prefix, or pass --overwrite")
    records = read_qa_records(records_path)
    saved_dir, info = save_beside_data(tokenizer_dir, prefix.parent)
    tokenizer = load_tokenizer(saved_dir)
    pad_id = info.pad_id if info.pad_id is not None else info.eos_id
    orders = choose_orders(len(records), seed, p_question_first)
    dtype = optimal_dtype(info.vocab_size)
    answer_tokens, counted_tokens, max_token_id = 0, 0, 0
    with IndexedWriter(mask_prefix(prefix), np.uint8) as masks, IndexedWriter(prefix, dtype) as tokens_out:
        for record, order in zip(records, orders):
            tokens, mask = encode_record(tokenizer, record, order, seq_len, info.eos_id, pad_id, info.bos_id)
            answer_tokens += int(mask.sum())
            if loss_on == "record":
                # Tokens 1 .. the end token; token 0 is only ever the label after the previous record's padding.
                mask[1:int(np.flatnonzero(mask)[-1]) + 1] = 1
            counted_tokens += int(mask.sum())
            tokens_out.add_document(tokens.astype(dtype))
            masks.add_document(mask)
            max_token_id = max(max_token_id, int(tokens.max()))
        counts = {o: orders.count(o) for o in ORDERS}
        meta = {"documents": len(records), "tokens": len(records) * seq_len, "dtype": dtype.name,
                "max_token_id": max_token_id, "vocab_size": info.vocab_size,
                "eos_id": info.eos_id, "tokenizer": {"dir": saved_dir.name, "fingerprint": info.fingerprint},
                "sft": {"seq_len": seq_len, "seed": seed, "p_question_first": p_question_first, "orders": counts,
                        "answer_tokens": answer_tokens, "loss_on": loss_on, "counted_tokens": counted_tokens,
                        "source": str(records_path), "pad_id": pad_id},
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        def commit_mask_and_meta() -> None:
            # The old token pair is gone by now: no moment pairs the new mask with old tokens.
            masks.finalize()
            write_meta(prefix, meta)

        tokens_out.finalize(before_commit=commit_mask_and_meta)
    return SFTSummary(str(prefix), len(records), counts, answer_tokens, time.time() - started, counted_tokens)


class MaskedTokens:
    """An IndexedDataset whose `get` returns -(id + 1) where the loss mask is 0 (see the module docstring)."""

    def __init__(self, tokens: IndexedDataset, mask: IndexedDataset):
        if not np.array_equal(tokens.lengths, mask.lengths):
            raise DataError(f"{mask.prefix} does not match its token pair {tokens.prefix} (other document "
                            "lengths)", "prepare the QA records again (megakv-qa prep)")
        self.tokens, self.mask = tokens, mask

    def __getattr__(self, name: str):
        return getattr(self.tokens, name)  # lengths, len, num_tokens ... are the token pair's

    def __len__(self) -> int:
        return len(self.tokens)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        ids = self.tokens.get(i, offset, length).astype(np.int64)
        keep = self.mask.get(i, offset, length).astype(bool)
        return np.where(keep, ids, -ids - 1)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)


def check_prepared_window(prefix: str | Path, seq_len: int, meta: dict | None) -> bool:
    """Whether `prefix` holds QA records (a loss mask beside it); raises when they were prepared as samples of
    another length than the run's windows."""
    if not pair_exists(mask_prefix(prefix)):
        return False
    prepared = ((meta or {}).get("sft") or {}).get("seq_len")
    if prepared != seq_len:
        raise DataError(f"{prefix} holds QA records prepared as {prepared}-token samples, but the run "
                        f"trains on {seq_len}-token windows", f"set data.seq_len={prepared}, or prepare the "
                        f"records again with megakv-qa prep --seq-len {seq_len}")
    return True


def attach_loss_mask(source, seq_len: int, meta: dict | None) -> None:
    """Give a loader Source its loss mask when one was prepared beside it (and check its window length)."""
    if not check_prepared_window(source.prefix, seq_len, meta):
        return
    source.dataset = MaskedTokens(source.dataset, IndexedDataset(mask_prefix(source.prefix)))
    source.record_aligned = True  # every record one sample, none lost to the one-token overlap of windows


def inputs_and_labels(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, labels) of samples (batch, seq_len + 1); labels are IGNORE where they do not count."""
    import torch  # here, not at the top: megakv-qa and its --help need no torch (1.4 s to import)

    ids = torch.where(block < 0, -block - 1, block)
    labels = torch.where(block < 0, torch.full_like(block, IGNORE), block)
    return ids[:, :-1].contiguous(), labels[:, 1:].contiguous()
