"""A tiny prepared dataset for tests and node checks: synthetic English-like text, a small SentencePiece
tokenizer, one .bin/.idx pair, made offline in a few seconds."""

from __future__ import annotations

import json
import random
from pathlib import Path

SUBJECTS = ["the king", "a fool", "my lord", "the queen", "this knight", "our friend", "the ghost", "a maid"]
VERBS = ["speaks of", "dreams of", "fights", "loves", "betrays", "follows", "remembers", "forgets"]
OBJECTS = ["the crown", "his sword", "the night", "her father", "the sea", "a letter", "the storm", "old Rome"]
ENDINGS = [".", "!", "?", ", and the night is long.", ", for honour's sake."]


def synthetic_text(documents: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for _ in range(documents):
        lines = []
        for _ in range(rng.randint(4, 12)):
            sentence = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}{rng.choice(ENDINGS)}"
            lines.append(sentence[0].upper() + sentence[1:])
        docs.append("\n".join(lines))
    return docs


def prepare_tiny_dataset(root: Path, vocab_size: int = 300) -> Path:
    """A tiny prepared dataset (a few seconds): synthetic English-like text, a SentencePiece tokenizer, one
    .bin/.idx pair. Writes root/corpus.jsonl, root/tokenizer_src and root/data/train.{bin,idx}; returns the
    dataset prefix (its tokenizer is root/data/tokenizer, as megakv-prep saves it)."""
    from megakv.data.preprocess import preprocess
    from megakv.data.tokenizer import train_sentencepiece

    root.mkdir(parents=True, exist_ok=True)
    docs = synthetic_text()
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_sentencepiece(docs, root / "tokenizer_src", vocab_size)
    prefix = root / "data" / "train"
    preprocess([str(corpus)], root / "tokenizer_src", prefix, workers=1, progress=False)
    return prefix
