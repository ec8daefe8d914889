"""A megakv tokenizer directory -> files that `transformers.AutoTokenizer.from_pretrained` loads offline.

A megakv SentencePiece directory (`tokenizer.model` + `megakv_tokenizer.json`, see megakv.data.tokenizer) is
rebuilt as a `tokenizers` pipeline (tokenizer.json, class PreTrainedTokenizerFast) with SentencePiece's ids:

  normalizer  one "▁" in front of the text (SentencePiece's dummy prefix, put there even when the text starts
              with a space), then every space -> "▁"; nothing else (the models are trained with identity
              normalisation). No pre-tokenizer: SentencePiece does not split at whitespace when it encodes.
  model       BPE: the SentencePiece vocabulary, same ids, and a merge for every way of writing a piece as two
              pieces, ranked by the piece's score, which is how SentencePiece picks the pair to merge next;
              byte fallback to the <0xNN> pieces for characters outside the vocabulary.
              (unigram models: tokenizers' Unigram with the pieces' scores; see the exceptions.)
  decoder     "▁" -> " ", runs of <0xNN> -> UTF-8, the dummy prefix's leading space dropped.
  specials    <unk> <s> </s> <pad> are transformers' unk/bos/eos/pad tokens, never matched in text
              (split_special_tokens, as SentencePiece treats "<s>" in text as text), and the tokenizer adds
              nothing around the ids by default (megakv's data has no bos unless --prepend-bos).

So for a BPE tokenizer (what `megakv-tokenizer train` makes by default) `tok(text).input_ids == encode(text)`
and `tok.decode(ids) == decode(ids)` for the ids of any text. Known exceptions:
  - decoding ids that encoding never produces: special ids (SentencePiece drops <s> </s> <pad> and writes <unk>
    as " ⁇ "; transformers writes the token, or drops every special with skip_special_tokens=True); byte
    pieces that are not valid UTF-8 (SentencePiece writes U+FFFD per bad byte and keeps the good ones,
    transformers' ByteFallback writes U+FFFD for every byte of the run); a first piece <0x20> (SentencePiece
    keeps that space).
  - BPE encoding, in principle: SentencePiece breaks a tie between two pairs that make the same piece by
    position, transformers by rank. They can differ only when one piece can be made from two different
    overlapping pairs of the current symbols at once ("ab" "a" "ba" with a piece "aba"); the tests meet none
    on prose, whitespace runs, symbol runs, mixed scripts or random concatenations of pieces.
  - unigram models are close, not exact: where two segmentations score the same (runs of one character,
    e.g. many spaces), SentencePiece's float32 rounding picks one and transformers' float64 Viterbi may pick
    the other; and the name of a control or byte piece ("<s>", "<0x41>") in text is matched as that piece
    when one of its characters is outside the vocabulary. A warning says so on export.

A directory that already is a Hugging Face tokenizer (megakv kind "huggingface", or a plain transformers
directory) has its tokenizer files copied as they are.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

from megakv.data.errors import DataError
from megakv.data.tokenizer import METADATA_FILE, SPM_MODEL_FILE, TokenizerInfo, checked_source

# Files that make up a transformers tokenizer (copied when the source already is one).
HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "vocab.json",
    "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
# What write_hf_tokenizer writes for a SentencePiece directory.
GENERATED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SPACE = "\u2581"  # SentencePiece's "▁"
SHIM_MODULE, SHIM_CLASS = "tokenization_megakv", "MegaKVTokenizerFast"
SHIM_SOURCE = f"""\"\"\"Written by megakv: load tokenizer.json as transformers' PreTrainedTokenizerFast.\"\"\"

from transformers import PreTrainedTokenizerFast


class {SHIM_CLASS}(PreTrainedTokenizerFast):
    pass
"""

# sentencepiece_model.proto enums
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2


def is_sentencepiece_dir(directory: str | Path) -> bool:
    """A megakv tokenizer directory of kind "sentencepiece" (metadata + tokenizer.model)."""
    directory = Path(directory)
    if not (directory / METADATA_FILE).is_file() or not (directory / SPM_MODEL_FILE).is_file():
        return False
    try:
        return TokenizerInfo.read(directory).kind == "sentencepiece"
    except DataError:  # unreadable metadata: not one megakv can load either
        return False


def write_hf_tokenizer(megakv_tokenizer_dir: str | Path, out_dir: str | Path) -> list[str]:
    """Write the transformers tokenizer files for `megakv_tokenizer_dir` into `out_dir`; returns their names.

    SentencePiece directories get tokenizer.json / tokenizer_config.json / special_tokens_map.json built
    from `tokenizer.model`; Hugging Face tokenizer directories have their tokenizer files copied. A
    directory holding neither gives an empty list.
    """
    src, out = Path(megakv_tokenizer_dir), Path(out_dir)
    if not src.is_dir():
        raise DataError(f"tokenizer directory {src} not found", "pass a megakv tokenizer directory")
    if not is_sentencepiece_dir(src):
        names = [name for name in HF_TOKENIZER_FILES if (src / name).is_file()]
        if names:
            out.mkdir(parents=True, exist_ok=True)
        for name in names:
            if (src / name).resolve() != (out / name).resolve():
                shutil.copy2(checked_source(src / name, src), out / name)
        return names
    info = TokenizerInfo.read(src)
    tokenizer, specials = build_fast_tokenizer(src / SPM_MODEL_FILE)
    if tokenizer.model.__class__.__name__ == "Unigram":
        warnings.warn(f"{src} is a unigram SentencePiece model: the transformers tokenizer written to {out} may "
                      "segment runs of one repeated character (e.g. many spaces) differently; BPE models "
                      "(the default of megakv-tokenizer train) give the same ids", stacklevel=2)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out / "tokenizer.json"))
    special_map = {key: specials[key] for key in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if specials.get(key) is not None}
    # The eos megakv appends to documents is the metadata's (it may differ from the model's </s> piece).
    eos_piece = tokenizer.id_to_token(info.eos_id)
    if eos_piece is not None:
        special_map["eos_token"] = eos_piece
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": False,
        "add_eos_token": False,
        "split_special_tokens": True,  # "<s>" in text is text, as for SentencePiece
        "clean_up_tokenization_spaces": False,  # decode gives SentencePiece's text, spaces and all
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2, ensure_ascii=False) + "\n")
    return [*GENERATED_FILES, *_route_auto_tokenizer(out, config)]


def _route_auto_tokenizer(out: Path, config: dict) -> list[str]:
    """Make AutoTokenizer honour `tokenizer_class` in a model directory; returns the files added.

    transformers 5 ignores the declared class for some model types (qwen2, phi3...: its
    MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS) and rebuilds a byte-level pipeline of its own from the vocabulary,
    which gives other ids. It does follow a tokenizer `auto_map`: that entry and a two-line module naming the
    same class are added, only where the plain files load as another class.
    """
    if not (out / "config.json").is_file():
        return []  # without a model config AutoTokenizer goes by tokenizer_class
    try:
        loads_as_declared = _auto_tokenizer_class(out) is _fast_class()
    except Exception as e:  # a model type this process cannot resolve: leave the files as they are
        warnings.warn(f"could not check that transformers.AutoTokenizer loads {out}: {e}", stacklevel=2)
        return []
    if not loads_as_declared:
        config["auto_map"] = {"AutoTokenizer": [None, f"{SHIM_MODULE}.{SHIM_CLASS}"]}
        (out / f"{SHIM_MODULE}.py").write_text(SHIM_SOURCE)
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
        if _auto_tokenizer_class(out) is not _fast_class():
            warnings.warn(f"transformers.AutoTokenizer does not load {out} as {config['tokenizer_class']} and may "
                          "give other ids: load it with transformers.PreTrainedTokenizerFast.from_pretrained",
                          stacklevel=2)
        return [f"{SHIM_MODULE}.py"]
    return []


def _fast_class():
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast


def _auto_tokenizer_class(directory: Path) -> type:
    from transformers import AutoTokenizer

    return type(AutoTokenizer.from_pretrained(str(directory), local_files_only=True))


def _read_model_proto(model_file: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    return proto


def build_fast_tokenizer(model_file: str | Path):
    """A `tokenizers.Tokenizer` reproducing the SentencePiece model (BPE or unigram) in `model_file`.

    Returns (tokenizer, {"bos_token": ..., "eos_token": ..., "unk_token": ..., "pad_token": ...}).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers

    model_file = Path(model_file)
    proto = _read_model_proto(model_file)
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    problems = []
    if trainer.model_type not in (_UNIGRAM, _BPE):
        problems.append("model type is neither BPE nor unigram")
    if norm.name not in ("identity", "") or norm.precompiled_charsmap:
        problems.append(f"normalisation {norm.name!r} is not identity")
    if norm.remove_extra_whitespaces:
        problems.append("remove_extra_whitespaces is on")
    if not norm.escape_whitespaces:
        problems.append("escape_whitespaces is off")
    if trainer.treat_whitespace_as_suffix:
        problems.append("treat_whitespace_as_suffix is on")
    if any(p.type == _UNUSED for p in proto.pieces):
        problems.append("it has unused pieces")
    if len({p.piece for p in proto.pieces}) != len(proto.pieces):
        problems.append("a piece appears twice")
    if trainer.byte_fallback and not {f"<0x{b:02X}>" for b in range(256)} <= {p.piece for p in proto.pieces}:
        problems.append("byte fallback is on but byte pieces are missing")
    if problems:
        raise DataError(f"{model_file}: cannot build an exact transformers tokenizer ({'; '.join(problems)})",
                        "megakv exports the tokenizers `megakv-tokenizer train` makes (identity normalisation, "
                        "whitespace kept)")

    unk_piece = proto.pieces[trainer.unk_id].piece if trainer.unk_id >= 0 else None
    model = _bpe_model(proto, unk_piece) if trainer.model_type == _BPE else _unigram_model(proto)
    tokenizer = Tokenizer(model)
    # SentencePiece puts "▁" in front of the text even when it starts with a space (Metaspace would not).
    steps = [normalizers.Prepend(SPACE)] if norm.add_dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if norm.add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                  for p in proto.pieces if p.type in (_UNKNOWN, _CONTROL)])

    def piece_of(piece_id: int) -> str | None:
        return proto.pieces[piece_id].piece if 0 <= piece_id < len(proto.pieces) else None

    return tokenizer, {"bos_token": piece_of(trainer.bos_id), "eos_token": piece_of(trainer.eos_id),
                       "unk_token": unk_piece, "pad_token": piece_of(trainer.pad_id)}


def _bpe_model(proto, unk_piece: str | None):
    """SentencePiece BPE merges, at each step, the adjacent pair of symbols whose concatenation is the piece of
    best score (ties: leftmost), considering normal and user-defined pieces only. As `tokenizers` BPE: one
    merge per way of writing a normal piece as two such pieces, ranked by the piece's score."""
    from tokenizers import models

    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    mergeable = {p.piece for p in proto.pieces if p.type in (_NORMAL, _USER_DEFINED)}
    candidates = []
    for i, p in enumerate(proto.pieces):
        if p.type != _NORMAL:
            continue
        for k in range(1, len(p.piece)):
            left, right = p.piece[:k], p.piece[k:]
            if left in mergeable and right in mergeable:
                candidates.append((-p.score, i, vocab[left], vocab[right], left, right))
    candidates.sort()
    return models.BPE(vocab=vocab, merges=[(left, right) for *_, left, right in candidates], unk_token=unk_piece,
                      fuse_unk=True, byte_fallback=bool(proto.trainer_spec.byte_fallback), dropout=None)


def _unigram_model(proto):
    """SentencePiece unigram: Viterbi over normal and user-defined pieces. `tokenizers` Unigram matches every
    vocabulary entry in text, so control, unknown and byte pieces get a score no segmentation would pick
    (as long as the characters of their names, e.g. "<", ">", are in the vocabulary)."""
    from tokenizers import models

    normal = [p.score for p in proto.pieces if p.type == _NORMAL]
    never = min(normal, default=0.0) * 1000 - 1e6
    vocab = [(p.piece, p.score if p.type in (_NORMAL, _USER_DEFINED) else never) for p in proto.pieces]
    unk_id = proto.trainer_spec.unk_id if proto.trainer_spec.unk_id >= 0 else None
    return models.Unigram(vocab, unk_id=unk_id, byte_fallback=bool(proto.trainer_spec.byte_fallback))


__all__ = ["GENERATED_FILES", "HF_TOKENIZER_FILES", "build_fast_tokenizer", "is_sentencepiece_dir",
           "write_hf_tokenizer"]
