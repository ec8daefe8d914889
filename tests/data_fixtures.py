"""Shared helpers for the data tests: small real files written inside each test (no network)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

WORDS = ("the king queen lord lady fool night day sword crown letter storm sea ghost castle wind fire "
         "speaks dreams loves betrays follows remembers forgets fights sings weeps laughs waits "
         "old young brave false true gentle bitter sweet dark bright cold").split()
PUNCTUATION = [".", "!", "?", ",", ";"]


def synthetic_documents(count: int = 200, seed: int = 0, min_lines: int = 2, max_lines: int = 12) -> list[str]:
    """English-like documents of varied length, with newlines, tabs, digits and some non-ASCII text."""
    rng = random.Random(seed)
    docs = []
    for i in range(count):
        lines = []
        for _ in range(rng.randint(min_lines, max_lines)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
            line = " ".join(words) + rng.choice(PUNCTUATION)
            if rng.random() < 0.1:
                line = "\t" + line + f" {rng.randint(0, 9999)}"
            if rng.random() < 0.05:
                line += " café — naïve ünïcode 日本"
            lines.append(line[0].upper() + line[1:])
        docs.append(f"Document {i}\n" + "\n".join(lines))
    return docs


def write_jsonl(path: Path, docs: list[str], key: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


def train_tokenizer(directory: Path, texts: list[str] | None = None, vocab_size: int = 400) -> Path:
    from megakv.data.tokenizer import train_sentencepiece

    train_sentencepiece(texts if texts is not None else synthetic_documents(300, seed=99), directory, vocab_size)
    return directory


def prepare(root: Path, docs: list[str], name: str = "train", tokenizer: Path | None = None, **kwargs) -> Path:
    """jsonl of `docs` -> root/name.{bin,idx} (tokenizer trained once per root unless given)."""
    from megakv.data.preprocess import preprocess

    tokenizer = tokenizer or root / "tokenizer_src"
    if not tokenizer.exists():
        train_tokenizer(tokenizer)
    corpus = write_jsonl(root / "raw" / f"{name}.jsonl", docs)
    prefix = root / "data" / name
    preprocess([str(corpus)], tokenizer, prefix, progress=False, **kwargs)
    return prefix


def module_tokenizer(tmp_path_factory) -> Path:
    """Body of a module-scoped `tokenizer_dir` fixture: `tokenizer_dir = pytest.fixture(scope="module")(...)`."""
    return train_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


# Runs a script with a file size limit (RLIMIT_FSIZE): past it a write fails with EFBIG, as one fails with
# ENOSPC on a full disk, without root or a tmpfs mount.
_LIMITED = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process instead of failing the write
limit = int(sys.argv.pop(1))
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
"""


def run_with_file_size_limit(limit: int, code: str, *args: str) -> subprocess.CompletedProcess:
    """`python -c code *args` with files limited to `limit` bytes; sys.argv[1:] are `args`."""
    return subprocess.run([sys.executable, "-c", _LIMITED + code, str(limit), *args], capture_output=True,
                          text=True, timeout=300)


def run_cli_with_file_size_limit(limit: int, module: str, *args: str) -> subprocess.CompletedProcess:
    """A command-line tool's real `main` (e.g. megakv.cli.prep) with files limited to `limit` bytes."""
    return run_with_file_size_limit(limit, f"from {module} import main\nsys.exit(main(sys.argv[1:]))", *args)
