"""Builders shared by the inference / eval / HF-modeling tests (this module holds no tests).

A tiny random megakv model, a word-level tokenizer that AutoTokenizer loads offline, a model directory
holding both, and a small .bin/.idx split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from megakv.config.model import ModelConfig
from megakv.model import MegaKVModel
from megakv.model_dir import save_model_dir

WORDS = ("the cat dog sat on a mat and ran to see red blue green big small fox jumps over lazy tree house "
         "river stone king queen says hello world what is it time day night").split()
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
VOCAB = len(SPECIALS) + len(WORDS)
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


def tiny_config(**overrides) -> ModelConfig:
    values = dict(vocab_size=VOCAB, d_model=64, n_layers=6, n_heads=4, n_kv_heads=2, ffn_hidden=96,
                  max_seq_len=64, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    values.update(overrides)
    return ModelConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> MegaKVModel:
    torch.manual_seed(seed)
    model = MegaKVModel(tiny_config(**overrides)).eval()
    # Larger-than-init weights make logits spread out, so greedy choices are not near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.mul_(4.0 if "embed" in name else 2.0)
            elif name.endswith("norm.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


def write_tokenizer(directory: Path) -> Path:
    """A whitespace word-level tokenizer (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    directory.mkdir(parents=True, exist_ok=True)
    vocab = {token: i for i, token in enumerate(SPECIALS + tuple(WORDS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "pad_token": "<pad>", "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>"}))
    return directory


def write_model_dir(root: Path, model: MegaKVModel | None = None, with_tokenizer: bool = True) -> Path:
    model = model or tiny_model()
    tokenizer_dir = write_tokenizer(root / "tok-src") if with_tokenizer else None
    return save_model_dir(model.cfg, model.state_dict(), root / "model", tokenizer_dir=tokenizer_dir)


def random_text(n_words: int, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, size=n_words)
    return "\n\n".join(" ".join(words[i:i + 20]) for i in range(0, n_words, 20))


def write_indexed_split(prefix: Path, n_docs: int = 12, doc_len: int = 40, seed: int = 0) -> Path:
    from megakv.data.indexed import IndexedWriter

    rng = np.random.default_rng(seed)
    with IndexedWriter(prefix, np.uint16) as writer:
        for _ in range(n_docs):
            doc = rng.integers(len(SPECIALS), VOCAB, size=doc_len)
            writer.add_document(np.append(doc, EOS_ID))
        writer.finalize()
    return prefix
