"""Tokenizers: train a SentencePiece model, import a Hugging Face tokenizer directory, save, load.

A megakv tokenizer directory is self-contained: the tokenizer's own files plus `megakv_tokenizer.json`
(kind, vocab size, special ids, fingerprint). One is saved beside every prepared dataset and copied into
every model directory, so training can refuse a model whose vocabulary does not fit the data and
generation decodes with exactly the tokenizer the data was made with.

Kinds:
  sentencepiece   `tokenizer.model` (trained here: BPE by default, byte fallback, lossless round trip)
  huggingface     anything `transformers.AutoTokenizer.from_pretrained(dir)` loads offline
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import threading
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from megakv.data.errors import DataError
from megakv.directories import replace_directory

_HF_LOAD_LOCK = threading.Lock()  # see _load_hf

METADATA_FILE = "megakv_tokenizer.json"
SPM_MODEL_FILE = "tokenizer.model"
KINDS = ("sentencepiece", "huggingface")
# SentencePiece ids fixed at training time (Llama convention for unk/bos/eos, plus a pad).
SPM_SPECIAL_IDS = {"unk_id": 0, "bos_id": 1, "eos_id": 2, "pad_id": 3}
# Any real tokenizer encodes this into ordinary tokens (not only unk or specials); one that cannot is broken.
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. 0123456789"
MIN_PROBE_TOKENS = 1
SPM_MAX_SENTENCE_BYTES = 16384  # SentencePiece skips longer training lines: _sentences cuts them up


@dataclass(frozen=True)
class TokenizerInfo:
    kind: str
    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int | None
    unk_id: int | None
    fingerprint: str  # sha256 of the tokenizer's files: identifies it across copies

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def read(cls, directory: str | Path) -> TokenizerInfo:
        path = Path(directory) / METADATA_FILE
        try:
            raw = json.loads(path.read_text())
            return cls(**{name: raw[name] for name in cls.__dataclass_fields__})
        except FileNotFoundError:
            raise DataError(f"{path} not found: {directory} is not a megakv tokenizer directory",
                            "create one with `megakv-tokenizer train` or `megakv-tokenizer import`") from None
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path} is malformed ({e})", "re-create the tokenizer directory") from None


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int
    bos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...  # data: special-token text such as "<|im_end|>" stays text

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...  # the same, for many texts

    def encode_prompt(self, text: str) -> list[int]: ...  # typed by a person: "<|im_end|>" is the special token,
    # and a tokenizer that starts every text with bos (Llama's) starts a prompt with it

    def decode(self, ids: list[int]) -> str: ...


class _WithInfo:
    def __init__(self, info: TokenizerInfo):
        self.info = info
        self.vocab_size, self.eos_id = info.vocab_size, info.eos_id
        self.bos_id, self.pad_id, self.unk_id = info.bos_id, info.pad_id, info.unk_id


class SentencePieceTokenizer(_WithInfo):
    def __init__(self, directory: Path, info: TokenizerInfo):
        import sentencepiece as spm

        super().__init__(info)
        model_file = directory / SPM_MODEL_FILE
        if not model_file.is_file():
            raise DataError(f"{model_file} not found: the sentencepiece tokenizer directory {directory} is "
                            "incomplete", "copy the whole tokenizer directory again, or re-create it with "
                            "`megakv-tokenizer train`")
        try:
            self._sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except (RuntimeError, OSError) as e:
            raise DataError(f"{model_file} is not a SentencePiece model ({e})",
                            "re-create the tokenizer directory with `megakv-tokenizer train`") from None

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # One thread: parallelism comes from the worker processes, never from hidden threads.
        return self._sp.encode(texts, num_threads=1)

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text)  # SentencePiece reads no special tokens out of text

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(_WithInfo):
    def __init__(self, tok, info: TokenizerInfo):
        super().__init__(info)
        self._tok = tok

    # Data is text: a document that quotes "<|endoftext|>" must not gain a document end (nor a chat turn).
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        out = self._tok(texts, add_special_tokens=False, return_attention_mask=False, verbose=False,
                        split_special_tokens=True)
        return out["input_ids"]

    def encode_prompt(self, text: str) -> list[int]:
        """The ids transformers' `tokenizer(text)` gives a prompt, with what it adds at the start (Llama's bos)
        but not at the end (an eos would end the text to be continued), and one bos where the text itself
        begins with it (a chat template's output)."""
        plain = self._tok.encode(text, add_special_tokens=False)
        full = self._tok.encode(text, add_special_tokens=True)
        if plain:
            prefix = full[:next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), 0)]
        else:  # "" (generation from nothing): its bos, if the tokenizer adds one
            prefix = full[:1] if full[:1] == [self.bos_id] else []
        if prefix[-1:] == plain[:1] == [self.bos_id]:
            prefix = prefix[:-1]
        return prefix + plain

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def _load_hf(directory: Path):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # worker processes give the parallelism
    # transformers resolves its classes lazily on first use, and that is not thread-safe: two threads
    # loading at once got "cannot import name 'AutoTokenizer'". Loads take turns.
    with _HF_LOAD_LOCK:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        except Exception as e:  # transformers raises many types (OSError, ValueError, KeyError...)
            raise DataError(f"cannot load a Hugging Face tokenizer from {directory}: {e}",
                            "pass a megakv tokenizer directory or one AutoTokenizer loads offline "
                            "(tokenizer.json / tokenizer_config.json ...)") from None


def load_tokenizer(directory: str | Path, model_eos_ids: Sequence[int] = ()) -> Tokenizer:
    """Load a megakv tokenizer directory (or, failing that, a plain Hugging Face one). The first of
    `model_eos_ids` (the model config's, for generation and evaluation) stands in for the eos token a plain
    Hugging Face tokenizer may not name: transformers' generate() takes it from the model config too."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"tokenizer directory {directory} not found",
                        "pass the tokenizer/ directory written beside the prepared data")
    if (directory / METADATA_FILE).exists():
        info = TokenizerInfo.read(directory)
        if info.kind == "sentencepiece":
            return SentencePieceTokenizer(directory, info)
        return HuggingFaceTokenizer(_load_hf(directory), info)
    # A plain Hugging Face directory may also hold model weights: do not hash it just to load it.
    tok = _load_hf(directory)
    try:
        return HuggingFaceTokenizer(tok, _hf_info(tok, "unsaved", None, eos_id=next(iter(model_eos_ids), None)))
    except DataError:  # worded for megakv-prep's --eos-token, which the tools loading a model's tokenizer lack
        raise DataError(f"the tokenizer in {directory} names no end-of-sequence token (eos_token), and the model "
                        "config names none either (eos_token_id)", f"set eos_token in {directory}/"
                        "tokenizer_config.json, or eos_token_id in the model's config") from None


@lru_cache(maxsize=4)
def cached_tokenizer(directory: str, fingerprint: str) -> Tokenizer:
    """One loaded tokenizer per process, directory and `fingerprint` (worker processes call this for every
    batch; keyed by the fingerprint too, so a directory replaced by another tokenizer is loaded again)."""
    return load_tokenizer(directory)


def check_encodes(tokenizer: Tokenizer, directory: str | Path) -> None:
    """Refuse a tokenizer that cannot turn a plain English sentence into ordinary tokens."""
    ids = tokenizer.encode(PROBE_TEXT)
    special = {tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id, getattr(tokenizer, "unk_id", None)}
    ordinary = [i for i in ids if i not in special]
    if len(ordinary) < MIN_PROBE_TOKENS:  # ids outside the vocabulary are named per record by megakv-prep
        raise DataError(f"the tokenizer in {directory} (vocab {tokenizer.vocab_size}) cannot encode the probe "
                        f"text {PROBE_TEXT!r}: it gives {ids[:8]}", "point at a directory holding a complete "
                        "tokenizer (tokenizer.json, or tokenizer.model / vocab files), or train one with "
                        "`megakv-tokenizer train`")


def read_info(directory: str | Path) -> TokenizerInfo:
    """Metadata of a tokenizer directory without loading the tokenizer (megakv directories only)."""
    return TokenizerInfo.read(directory)


def check_model_vocab(model_vocab_size: int, tokenizer_vocab_size: int, tokenizer_dir: str | Path) -> None:
    """Refuse a model with fewer embedding rows than the tokenizer in `tokenizer_dir` has tokens."""
    if model_vocab_size < tokenizer_vocab_size:
        raise DataError(f"the model's vocabulary ({model_vocab_size}) is smaller than the tokenizer {tokenizer_dir} "
                        f"({tokenizer_vocab_size} tokens)",
                        f"set model.vocab_size >= {tokenizer_vocab_size} (a multiple of 64 is faster)")


def verified_info(directory: str | Path) -> TokenizerInfo:
    """A megakv tokenizer directory's metadata, after checking that its files load and are the files the
    metadata describes (their fingerprint is what tells copies of one tokenizer apart from other tokenizers)."""
    info = read_info(directory)
    load_tokenizer(directory)
    files = _fingerprint_dir(Path(directory), info.kind)
    if files != info.fingerprint:
        raise DataError(f"{directory}: its files do not match its {METADATA_FILE} (fingerprint {files[:12]}, the "
                        f"metadata says {info.fingerprint[:12]}): they were changed after the tokenizer was saved",
                        "re-create the directory with `megakv-tokenizer train` or `megakv-tokenizer import`")
    return info


def encode_alike(first: str | Path, second: str | Path) -> bool | None:
    """Whether two tokenizer directories give the same ids: copies of one tokenizer (same files), or different
    files that agree on the vocabulary size, bos id and a probe text's ids (a re-saved Hugging Face
    tokenizer, a plain transformers directory beside its megakv import). None when one cannot be loaded.
    The end-of-document token is not compared: data prepared with `--eos-token '<|im_end|>'` has the same ids
    as the tokenizer it was made with (the fingerprint, which says "same files", ignores it too)."""
    try:
        if read_info(first).fingerprint == read_info(second).fingerprint:
            return True
    except DataError:
        pass  # a plain Hugging Face directory (megakv-convert from-hf copies one) has no megakv metadata
    try:
        tokenizers = load_tokenizer(first), load_tokenizer(second)
    except DataError:
        return None
    a, b = ((t.vocab_size, t.bos_id, t.encode(PROBE_TEXT)) for t in tokenizers)
    return a == b


# ---------------------------------------------------------------------------------------------- saving


def _special_ids(info: TokenizerInfo) -> str:
    return f"eos {info.eos_id}, bos {info.bos_id}, pad {info.pad_id}, unk {info.unk_id}"


class LinkRefused(DataError):
    """A tokenizer file a copy must not follow (see checked_source)."""


def _in_hf_cache(target: Path) -> bool:
    """A file of Hugging Face's cache, where a snapshot's files are links into the repository's blobs folder
    (models--ORG--NAME/snapshots/REV/tokenizer.json -> ../../blobs/SHA; `--local-dir` downloads linked there too)."""
    return target.parent.name == "blobs" and target.parent.parent.name.startswith("models--")


def checked_source(path: Path, root: Path) -> Path:
    """`path`, a file of the tokenizer directory `root`, once it is safe to copy: a regular file in `root`, or a
    link to one in `root` or in Hugging Face's cache. A copy never follows a link elsewhere: a received directory
    whose tokenizer/README.txt linked to ~/.ssh/id_ed25519 put the key into an export, readable by everyone."""
    target = path.resolve()
    if not (target.is_relative_to(root.resolve()) or _in_hf_cache(target)):
        raise LinkRefused(f"{path} is a link to {target}, outside the tokenizer directory {root}: a copy would "
                          "carry that file's contents along (a tokenizer directory megakv writes holds no links)",
                          "delete the link, or put the file itself in its place if it is part of the tokenizer")
    if not target.is_file():
        raise LinkRefused(f"{path} is not a regular file (a link to a directory, a pipe or a device?): a "
                          "tokenizer directory holds only files", "delete it")
    return path


def copy_tokenizer_dir(source: Path, target: Path) -> None:
    """Copy the tokenizer directory `source` to the new directory `target`, as plain files (see checked_source)."""
    target.mkdir(parents=True)
    for path in sorted(source.rglob("*")):
        if path.is_dir() and not path.is_symlink():
            continue  # created with the files in it
        destination = target / path.relative_to(source)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(checked_source(path, source), destination)


def refresh_copy(source: Path, target: Path) -> None:
    """Make `target` a copy of the tokenizer directory `source`, replacing a copy of another tokenizer (a
    run directory reused for other data) atomically; an identical copy is left alone."""
    wanted = TokenizerInfo.read(source)
    if target.exists():
        try:
            if TokenizerInfo.read(target) == wanted:
                return
        except DataError:  # a damaged copy: replaced like another tokenizer's
            pass
    tmp = target.with_name(f"{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        copy_tokenizer_dir(source, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, target)


def _own_files(directory: Path, kind: str | None = None) -> list[Path]:
    """The files a tokenizer consists of. A SentencePiece tokenizer is its model file: the transformers files
    (and, in a transformers model directory, the model) an export puts beside it are not part of it. Any other
    kind: every file but the metadata and a transformers model's own files."""
    if kind == "sentencepiece":
        return [directory / SPM_MODEL_FILE]
    return sorted(p for p in directory.rglob("*")
                  if p.is_file() and p.name != METADATA_FILE and not _is_model_file(p.relative_to(directory)))


def _is_model_file(relative: Path) -> bool:
    """A transformers model's own file, beside the tokenizer files in an exported model directory (a saved or
    imported tokenizer directory holds none)."""
    return len(relative.parts) == 1 and (relative.name in ("config.json", "generation_config.json")
                                         or relative.suffix in (".safetensors", ".py", ".bin")
                                         or relative.name.endswith(".safetensors.index.json"))


def _fingerprint_dir(directory: Path, kind: str | None = None) -> str:
    """sha256 over the tokenizer's own files (names and bytes); a saved SentencePiece directory holds only its
    model file, so both readings agree there."""
    digest = hashlib.sha256()
    for path in _own_files(directory, kind):
        digest.update(str(path.relative_to(directory)).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def _write_metadata(directory: Path, info: TokenizerInfo) -> None:
    tmp = directory / f"{METADATA_FILE}.tmp"
    tmp.write_text(info.to_json())
    tmp.replace(directory / METADATA_FILE)


def _sentences(texts: Iterable[str], max_bytes: int, stats: Counter | None = None) -> Iterator[str]:
    # SentencePiece trains on lines; newlines themselves are a user-defined symbol (see below). It drops a
    # line over max_sentence_length bytes, so a longer one goes in as pieces (they only feed its counts).
    for text in texts:
        for line in text.split("\n"):
            if not line.strip():
                continue
            data = line.encode("utf-8", "surrogatepass")
            if len(data) <= max_bytes:
                yield line
                continue
            if stats is not None:
                stats["split_lines"] += 1
            for piece in _pieces(data, max_bytes):
                text_piece = piece.decode("utf-8", "surrogatepass")
                if text_piece.strip():
                    yield text_piece


def _pieces(data: bytes, max_bytes: int) -> Iterator[bytes]:
    """`data` (UTF-8) cut into pieces of at most max_bytes, before a whitespace where one lies in the second
    half of the window, else at a character boundary (never inside a UTF-8 character)."""
    start = 0
    while len(data) - start > max_bytes:
        window = data[start:start + max_bytes + 1]  # a cut before its last byte still leaves max_bytes
        cut = max(window.rfind(space) for space in (b" ", b"\t", b"\r", b"\x0b", b"\x0c"))
        if cut <= max_bytes // 2:
            cut = max_bytes
            while window[cut] & 0xC0 == 0x80:  # a continuation byte: back to the character's first byte
                cut -= 1
        yield data[start:start + cut]
        start += cut
    yield data[start:]


SPM_MODEL_TYPES = ("bpe", "unigram")  # the first is the default
SPM_MAX_SENTENCES = 2_000_000  # lines sampled for training (bounds memory and time)
SPM_CHARACTER_COVERAGE = 0.9999  # characters covered by pieces of their own; rarer ones fall back to bytes


def check_spm_settings(vocab_size: int, model_type: str = SPM_MODEL_TYPES[0], max_sentences: int = SPM_MAX_SENTENCES,
                       character_coverage: float = SPM_CHARACTER_COVERAGE) -> None:
    """Refuse settings SentencePiece cannot train with, before any text is read."""
    if model_type not in SPM_MODEL_TYPES:
        raise DataError(f"unknown SentencePiece model type {model_type!r}", "use bpe or unigram")
    min_vocab = 256 + len(SPM_SPECIAL_IDS) + 1 + 1  # byte pieces + specials + "\n" + at least one piece
    if vocab_size < min_vocab:
        raise DataError(f"vocab size {vocab_size} is too small for a byte-fallback tokenizer",
                        f"use at least {min_vocab} (typical: 8000 to 64000)")
    if max_sentences < 1:
        raise DataError(f"--max-sentences {max_sentences} must be positive", "e.g. 2000000")
    if not 0 < character_coverage <= 1:  # NaN fails too
        raise DataError(f"--character-coverage {character_coverage} must lie in (0, 1]", "e.g. 0.9999, or 0.98")


def train_sentencepiece(texts: Iterable[str], output_dir: str | Path, vocab_size: int, *,
                        model_type: str = SPM_MODEL_TYPES[0], max_sentences: int = SPM_MAX_SENTENCES,
                        character_coverage: float = SPM_CHARACTER_COVERAGE, seed: int = 0,
                        stats: Counter | None = None) -> TokenizerInfo:
    """Train a lossless SentencePiece tokenizer on `texts` and save it as a megakv tokenizer directory.

    Lossless: identity normalisation, whitespace kept, `\\n` a piece of its own, byte fallback for any
    character outside the vocabulary, so decode(encode(s)) == s for every string without U+2581. The one
    exception: U+2581 (LOWER ONE EIGHTH BLOCK, "▁") is SentencePiece's own sign for a space, so it decodes
    as a space (SentencePiece offers no escape for it).

    Lines longer than SPM_MAX_SENTENCE_BYTES are cut into pieces for training; `stats["split_lines"]`
    (if given) counts them.
    """
    import sentencepiece as spm

    check_spm_settings(vocab_size, model_type, max_sentences, character_coverage)
    output_dir = Path(output_dir)
    model = io.BytesIO()
    max_bytes = SPM_MAX_SENTENCE_BYTES
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_sentences(texts, max_bytes, stats), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            user_defined_symbols=["\n"], character_coverage=character_coverage,
            input_sentence_size=max_sentences, shuffle_input_sentence=True,
            max_sentence_length=max_bytes, num_threads=os.cpu_count() or 1, minloglevel=2,
            **SPM_SPECIAL_IDS, pad_piece="<pad>",
        )
    except RuntimeError as e:
        message = str(e).replace("--character_coverage", "--character-coverage")  # our CLI's spelling
        raise DataError(f"SentencePiece training failed: {message}",
                        "adjust --vocab-size as the message says (larger when the text has many distinct "
                        "characters, smaller when there is little text), or give more text") from None
    if not model.getvalue():
        raise DataError("SentencePiece produced no model (was the input empty?)", "check --input")
    tmp = output_dir.with_name(f"{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    (tmp / SPM_MODEL_FILE).write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    info = TokenizerInfo(kind="sentencepiece", vocab_size=sp.get_piece_size(), eos_id=sp.eos_id(),
                         bos_id=sp.bos_id(), pad_id=sp.pad_id(), unk_id=sp.unk_id(),
                         fingerprint=_fingerprint_dir(tmp))
    _write_metadata(tmp, info)
    replace_directory(tmp, output_dir)
    return info


def _hf_info(tok, fingerprint: str, eos_token: str | None, eos_id: int | None = None) -> TokenizerInfo:
    """`eos_id`: the end id when `tok` names no eos token and `eos_token` is not given (the model config's)."""
    vocab_size = max(len(tok), max(tok.get_vocab().values(), default=-1) + 1)
    # Membership, not "not the unk id": SmolLM2's <|endoftext|> is both its unk token and its document end.
    known = eos_token is None or eos_token in tok.get_vocab() or eos_token in tok.all_special_tokens
    if eos_token is not None:
        eos_id = tok.convert_tokens_to_ids(eos_token)
    elif tok.eos_token_id is not None:
        eos_id = tok.eos_token_id
    if eos_id is None or not known:
        raise DataError(f"the tokenizer has no end-of-document token (eos_token={eos_token or tok.eos_token!r})",
                        "pass --eos-token with a token of its vocabulary, e.g. '</s>' or '<|endoftext|>'")
    return TokenizerInfo(kind="huggingface", vocab_size=int(vocab_size), eos_id=int(eos_id),
                         bos_id=tok.bos_token_id, pad_id=tok.pad_token_id, unk_id=tok.unk_token_id,
                         fingerprint=fingerprint)


def import_hf_tokenizer(source: str | Path, output_dir: str | Path, eos_token: str | None = None) -> TokenizerInfo:
    """Save a Hugging Face tokenizer directory (loaded offline) as a megakv tokenizer directory."""
    tok = _load_hf(Path(source))
    check_encodes(HuggingFaceTokenizer(tok, _hf_info(tok, "unsaved", eos_token)), source)
    output_dir = Path(output_dir)
    tmp = output_dir.with_name(f"{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tok.save_pretrained(str(tmp))  # only the tokenizer's files, even if `source` also holds weights
        info = _hf_info(tok, _fingerprint_dir(tmp), eos_token)
        _write_metadata(tmp, info)
        replace_directory(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return info


def save_beside_data(source: str | Path, data_dir: str | Path,
                     eos_token: str | None = None) -> tuple[Path, TokenizerInfo]:
    """Make `data_dir/tokenizer` hold the tokenizer `source` (megakv or Hugging Face directory).

    Safe when several processes (a SLURM array) do it at once: each prepares a private copy and renames
    it into place; whoever loses the race checks that the winner's copy is the same tokenizer.
    """
    source, target = Path(source), Path(data_dir) / "tokenizer"
    if not source.is_dir():
        raise DataError(f"tokenizer directory {source} not found",
                        "train one with `megakv-tokenizer train` or pass a Hugging Face tokenizer directory")
    if target.exists() and source.resolve() == target.resolve():
        return target, TokenizerInfo.read(target)
    tmp = target.with_name(f"tokenizer.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if (source / METADATA_FILE).exists():
            check_encodes(load_tokenizer(source), source)  # before a copy can take the target's place
            info = TokenizerInfo.read(source)
            tmp.mkdir(parents=True)
            for path in [*_own_files(source, info.kind), source / METADATA_FILE]:  # not an export's model files
                destination = tmp / path.relative_to(source)
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(checked_source(path, source), destination)
        else:
            info = import_hf_tokenizer(source, tmp, eos_token)
        if not target.exists():
            try:
                os.rename(tmp, target)
                return target, info
            except OSError:  # another process won the race; compare below
                pass
        existing = TokenizerInfo.read(target)
        if existing.fingerprint == info.fingerprint and _fingerprint_dir(target, existing.kind) != existing.fingerprint:
            raise DataError(f"{target} is damaged: its files no longer match its {METADATA_FILE}",
                            f"delete {target}; the next run copies {source} again")
        if existing.fingerprint != info.fingerprint:
            raise DataError(f"{target} already holds a different tokenizer (fingerprint "
                            f"{existing.fingerprint[:12]} vs {info.fingerprint[:12]} of {source})",
                            "datasets in one directory share one tokenizer: write to another directory, "
                            f"or delete {target} and every dataset made with it")
        if existing != info:  # the same files with other special ids (--eos-token): the documents would end otherwise
            raise DataError(f"{target} holds this tokenizer with other special tokens ({_special_ids(existing)}) "
                            f"than {source} gives now ({_special_ids(info)}; --eos-token sets the end token)",
                            f"datasets in one directory share one tokenizer: pass --tokenizer {target} to use the "
                            "directory's own (or the --eos-token it was prepared with), or write to another directory")
        return target, existing
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
