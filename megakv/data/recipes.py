"""One-command corpora: fetch -> held-out split -> tokenizer -> `.bin/.idx` pairs -> `data.yaml`.

`prepare_corpus("shakespeare", DIR)` is the README demo (8k SentencePiece BPE); `prepare_corpus("mix", DIR)`
the larger study mix. Re-running is cheap: the download is cached, an existing tokenizer is kept, and
pairs already made from the same inputs are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from megakv.config.data import DataConfig
from megakv.data.corpora import (
    HELD_OUT_FRACTION,
    Document,
    corpus_sources,
    mix_corpus,
    shakespeare_corpus,
    write_splits,
)
from megakv.data.errors import DataError
from megakv.data.preprocess import PrepSummary, preprocess
from megakv.data.tokenizer import METADATA_FILE, TokenizerInfo, train_sentencepiece

CORPORA = {"shakespeare": shakespeare_corpus, "mix": mix_corpus}
DEFAULT_VOCAB = {"shakespeare": 8000, "mix": 32000}


@dataclass
class PreparedCorpus:
    output: Path
    tokenizer: TokenizerInfo
    train: list[Path]  # prefixes
    valid: list[Path]
    data_yaml: Path
    summaries: list[PrepSummary]


def fetch_corpus(name: str, output: str | Path) -> dict[str, dict[str, Path]]:
    """Download (cached), clean and split a corpus into `output/raw/{source}_{train,valid}.jsonl`."""
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}", f"use one of {sorted(CORPORA)}")
    corpus: dict[str, list[Document]] = CORPORA[name]()
    paths = write_splits(corpus, Path(output) / "raw", HELD_OUT_FRACTION[name])
    write_sources(Path(output), corpus_sources(name))
    return paths


SOURCES_FILE = "sources.json"  # beside data.yaml: each source's package and version


def write_sources(output: Path, sources: dict[str, str]) -> None:
    (output / SOURCES_FILE).write_text(json.dumps(sources, indent=2) + "\n")


def read_sources(output: str | Path) -> dict[str, str] | None:
    """The sources a prepared corpus was made from; None for one prepared before megakv recorded them."""
    path = Path(output) / SOURCES_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def train_texts(paths: dict[str, dict[str, Path]]):
    for source in paths.values():
        with open(source["train"], encoding="utf-8") as f:
            for line in f:
                yield json.loads(line)["text"]


def prepare_corpus(name: str, output: str | Path, *, vocab_size: int | None = None, workers: int = 1,
                   progress: bool = True) -> PreparedCorpus:
    if vocab_size is not None and vocab_size < 1:  # before the download, which takes minutes
        raise DataError(f"--vocab-size {vocab_size} must be positive", f"e.g. {DEFAULT_VOCAB.get(name, 8000)}")
    if workers < 1:
        raise DataError(f"--workers {workers} must be at least 1", "e.g. the number of CPU cores")
    output = Path(output).resolve()
    tokenizer_dir = output / "tokenizer"
    existing = TokenizerInfo.read(tokenizer_dir) if (tokenizer_dir / METADATA_FILE).exists() else None
    if existing is not None and vocab_size is not None and vocab_size != existing.vocab_size:
        raise DataError(f"{output} already holds a tokenizer of {existing.vocab_size} pieces, not {vocab_size}",
                        f"use --vocab-size {existing.vocab_size}, another --output, or delete {tokenizer_dir}")
    paths = fetch_corpus(name, output)
    if existing is not None:
        info = existing
        print(f"keeping the existing tokenizer {tokenizer_dir} (vocab {info.vocab_size}); delete it to retrain")
    else:
        info = train_sentencepiece(train_texts(paths), tokenizer_dir,
                                   DEFAULT_VOCAB[name] if vocab_size is None else vocab_size)
        print(f"trained a SentencePiece BPE tokenizer of {info.vocab_size} pieces -> {tokenizer_dir}")
    train, valid, summaries = [], [], []
    for source, split_paths in paths.items():
        for split, prefixes in (("train", train), ("valid", valid)):
            prefix = output / f"{source}_{split}"
            # overwrite: this directory belongs to the recipe; unchanged inputs are still skipped
            summary = preprocess([str(split_paths[split])], tokenizer_dir, prefix, workers=workers,
                                 progress=progress, overwrite=True)
            print(summary.format())
            summaries.append(summary)
            prefixes.append(prefix)
    data = DataConfig(datasets=[str(p) for p in train], valid_datasets=[str(p) for p in valid],
                      valid_fraction=0.0, tokenizer=str(tokenizer_dir))
    data_yaml = output / "data.yaml"
    data_yaml.write_text(f"# written by megakv-data ({name}); the model needs vocab_size >= {info.vocab_size}\n"
                         + OmegaConf.to_yaml(OmegaConf.create({"data": OmegaConf.structured(data)})))
    return PreparedCorpus(output, info, train, valid, data_yaml, summaries)
