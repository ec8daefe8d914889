"""Tokenizers: SentencePiece training, Hugging Face import, saving beside data, loading for generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from data_fixtures import module_tokenizer, synthetic_documents

from megakv.data.errors import DataError
from megakv.data.indexed import IndexedDataset
from megakv.data.tokenizer import (
    METADATA_FILE,
    TokenizerInfo,
    import_hf_tokenizer,
    load_tokenizer,
    read_info,
    save_beside_data,
    train_sentencepiece,
)

TRICKY = ["HAMLET\nTo be, or not  to be:\n\n  that is\tthe question.", " leading space", "trailing \n\n",
          "digits 12345 and unicode café — 日本 🙂", "\n", "a"]

tokenizer_dir = pytest.fixture(scope="module")(module_tokenizer)


def test_trained_sentencepiece_is_lossless_with_fixed_special_ids(tokenizer_dir):
    info = read_info(tokenizer_dir)
    assert (info.kind, info.vocab_size, info.unk_id, info.bos_id, info.eos_id, info.pad_id) == (
        "sentencepiece", 400, 0, 1, 2, 3)
    tok = load_tokenizer(tokenizer_dir)
    assert (tok.vocab_size, tok.eos_id, tok.bos_id, tok.pad_id) == (400, 2, 1, 3)
    for text in TRICKY:
        ids = tok.encode(text)
        assert all(0 <= i < 400 for i in ids)
        assert tok.eos_id not in ids
        assert tok.decode(ids) == text
    assert tok.encode_batch(TRICKY) == [tok.encode(t) for t in TRICKY]


def test_the_directory_is_self_contained(tokenizer_dir, tmp_path):
    assert sorted(p.name for p in tokenizer_dir.iterdir()) == [METADATA_FILE, "tokenizer.model"]
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in tokenizer_dir.iterdir():
        (copy / p.name).write_bytes(p.read_bytes())
    assert load_tokenizer(copy).encode(TRICKY[0]) == load_tokenizer(tokenizer_dir).encode(TRICKY[0])
    assert json.loads((copy / METADATA_FILE).read_text())["fingerprint"] == read_info(tokenizer_dir).fingerprint


def test_vocab_size_too_small_or_too_large_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="too small"):
        train_sentencepiece(["some text"], tmp_path / "t", 100)
    with pytest.raises(DataError, match="--vocab-size"):
        train_sentencepiece(["tiny corpus of few words"] * 3, tmp_path / "t", 5000)
    assert not (tmp_path / "t").exists()


def _hf_tokenizer(directory: Path, eos: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(synthetic_documents(80), trainer)
    kwargs = {"eos_token": "<|endoftext|>"} if eos else {}
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kwargs).save_pretrained(str(directory))
    return directory


def test_hugging_face_directory_is_imported_and_loaded_offline(tmp_path):
    source = _hf_tokenizer(tmp_path / "hf")
    plain = load_tokenizer(source)  # a plain HF directory loads too
    info = import_hf_tokenizer(source, tmp_path / "imported")
    assert (info.kind, info.vocab_size, info.eos_id, info.bos_id) == ("huggingface", 400, 1, None)
    assert import_hf_tokenizer(source, tmp_path / "again").fingerprint == info.fingerprint
    tok = load_tokenizer(tmp_path / "imported")
    text = synthetic_documents(3, seed=5)[2]
    assert tok.encode(text) == plain.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_hugging_face_tokenizer_without_eos_needs_eos_token(tmp_path):
    source = _hf_tokenizer(tmp_path / "hf", eos=False)
    with pytest.raises(DataError, match="--eos-token"):
        import_hf_tokenizer(source, tmp_path / "out")
    info = import_hf_tokenizer(source, tmp_path / "out", eos_token="<|endoftext|>")
    assert info.eos_id == 1
    with pytest.raises(DataError, match="--eos-token"):
        import_hf_tokenizer(source, tmp_path / "out2", eos_token="<not-a-token>")


def test_saving_beside_data_refuses_a_different_tokenizer(tokenizer_dir, tmp_path):
    target, info = save_beside_data(tokenizer_dir, tmp_path / "data")
    assert target == tmp_path / "data" / "tokenizer" and info == read_info(tokenizer_dir)
    assert save_beside_data(tokenizer_dir, tmp_path / "data")[1] == info  # same one again: fine
    other = tmp_path / "other"
    train_sentencepiece(synthetic_documents(100, seed=7), other, 350)
    with pytest.raises(DataError, match="already holds a different tokenizer"):
        save_beside_data(other, tmp_path / "data")
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["tokenizer"]  # no temp dirs left


def test_missing_or_malformed_metadata_is_explained(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(tmp_path / "nothing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / METADATA_FILE).write_text("{}")
    with pytest.raises(DataError, match="malformed"):
        TokenizerInfo.read(tmp_path / "bad")
    with pytest.raises(DataError, match="not a megakv tokenizer directory"):
        read_info(tmp_path)


def test_preprocessing_with_a_hugging_face_directory(tmp_path):
    from data_fixtures import write_jsonl

    from megakv.data.indexed import IndexedDataset
    from megakv.data.preprocess import preprocess

    source = _hf_tokenizer(tmp_path / "hf")
    docs = synthetic_documents(12, seed=6)
    preprocess([str(write_jsonl(tmp_path / "c.jsonl", docs))], source, tmp_path / "out" / "d", progress=False)
    saved = tmp_path / "out" / "tokenizer"
    assert read_info(saved).kind == "huggingface" and (saved / "tokenizer.json").exists()
    tok, ds = load_tokenizer(saved), IndexedDataset(tmp_path / "out" / "d")
    assert [tok.decode(ds[i][:-1].tolist()) for i in range(len(ds))] == docs
    assert all(ds[i][-1] == 1 for i in range(len(ds)))


def test_threads_loading_a_hugging_face_tokenizer_at_once_all_get_it(tmp_path):
    """transformers resolves its classes lazily, which is not thread-safe: in a fresh interpreter, three of four
    threads loading at once failed with "cannot import name 'AutoTokenizer'" before loads took turns."""
    import subprocess
    import sys

    directory = _hf_tokenizer(tmp_path / "hf")
    script = f"""
import threading
from megakv.data.tokenizer import load_tokenizer
failures = []
def load():
    try:
        assert load_tokenizer({str(directory)!r}).encode("the king") != []
    except Exception as e:
        failures.append(repr(e))
threads = [threading.Thread(target=load) for _ in range(4)]
[t.start() for t in threads]
[t.join() for t in threads]
print(failures)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout + out.stderr


def test_an_eos_token_that_is_also_the_unk_token_is_accepted(tmp_path):
    """SmolLM2's <|endoftext|> is both its unk token and its document separator: it was refused as 'not a token
    of the vocabulary' because its id equals the unk id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(synthetic_documents(80), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>").save_pretrained(str(tmp_path / "hf"))
    info = import_hf_tokenizer(tmp_path / "hf", tmp_path / "out", eos_token="<|endoftext|>")
    assert info.eos_id == 0 == info.unk_id
    with pytest.raises(DataError, match="--eos-token"):
        import_hf_tokenizer(tmp_path / "hf", tmp_path / "out2", eos_token="<not-a-token>")


def test_special_token_text_in_data_stays_text_but_a_prompt_may_use_it(tmp_path):
    """A document quoting "<|endoftext|>" (common in text about language models) must not gain a document end
    in the middle: data is encoded with special-token text split into ordinary pieces, as the SentencePiece
    tokenizers do; a prompt typed for megakv-generate keeps transformers' reading (the special token)."""
    from megakv.data.preprocess import preprocess

    source = _hf_tokenizer(tmp_path / "hf")
    info = import_hf_tokenizer(source, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    text = "the model wrote <|endoftext|> and went on"
    assert info.eos_id not in tok.encode(text) and info.eos_id not in tok.encode_batch([text])[0]
    assert tok.decode(tok.encode(text)) == text
    assert info.eos_id in tok.encode_prompt(text)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": text}) + "\n" + json.dumps({"text": "a second document"}) + "\n")
    preprocess([str(corpus)], tmp_path / "tok", tmp_path / "d", progress=False)
    first = IndexedDataset(tmp_path / "d")[0].tolist()
    assert first.count(info.eos_id) == 1 and first[-1] == info.eos_id  # one document, one end


def test_a_prompt_starts_with_bos_where_the_tokenizer_adds_one(tmp_path):
    """Llama's tokenizer starts every text with <s> (transformers' tokenizer(text) adds it); megakv-generate
    encoded prompts without it, so an imported Llama saw prompts it was never trained on unless the user knew
    to pass --add-bos. A prompt now starts as transformers starts it: one bos (also where the text is a chat
    template's output that begins with the bos text), and no eos at the end even where the tokenizer adds one."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(synthetic_documents(80), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    for name, template in (("llama", "<s> $A"), ("bos-and-eos", "<s> $A </s>")):
        tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", 1), ("</s>", 2)])
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>") \
            .save_pretrained(str(tmp_path / name))
        import_hf_tokenizer(tmp_path / name, tmp_path / f"{name}-megakv")
        ours, theirs = load_tokenizer(tmp_path / f"{name}-megakv"), AutoTokenizer.from_pretrained(tmp_path / name)
        text = "the quick brown fox"
        reference = theirs(text)["input_ids"]
        assert reference[0] == ours.bos_id == 1
        expected = reference[:-1] if name == "bos-and-eos" else reference
        assert ours.encode_prompt(text) == expected
        assert ours.encode_prompt("<s>" + text) == expected  # a chat template's text keeps one bos
        assert ours.encode_prompt("") == [1]
        assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"]  # data: no bos added
    import_hf_tokenizer(_hf_tokenizer(tmp_path / "hf"), tmp_path / "plain")
    plain = load_tokenizer(tmp_path / "plain")
    assert plain.encode_prompt("the quick brown fox") == plain.encode("the quick brown fox")  # adds nothing


def test_u2581_is_the_documented_exception_to_the_lossless_round_trip(tokenizer_dir):
    """The README promised decode(encode(s)) == s for every string; SentencePiece's own space sign U+2581 comes
    back as a space, and is now named as the one exception (README and train_sentencepiece)."""
    tok = load_tokenizer(tokenizer_dir)
    assert tok.decode(tok.encode("a\u2581b \u2581")) == "a b  "
    assert tok.decode(tok.encode("a\u2582b")) == "a\u2582b"  # its neighbours are ordinary characters
    assert "U+2581" in train_sentencepiece.__doc__ and "decodes as a space" in " ".join(
        train_sentencepiece.__doc__.split())
    readme = (Path(__file__).resolve().parents[1] / "data_prep" / "README.md").read_text()
    paragraph = readme[readme.index("Trained tokenizers are lossless"):][:400]
    assert "exception: U+2581" in paragraph and "decodes as a space" in paragraph


def test_long_lines_are_cut_for_training_at_whitespace_never_inside_a_character():
    """SentencePiece drops a training line over its max_sentence_length: such lines were lost silently."""
    from collections import Counter

    from megakv.data.tokenizer import _sentences

    lines = ["short line", "word " * 10, "日本語" * 10, "ab " + "é" * 20, " " * 40]
    stats: Counter = Counter()
    pieces = list(_sentences(["\n".join(lines)], 16, stats))
    assert stats["split_lines"] == 3 and all(len(p.encode()) <= 16 for p in pieces)
    assert "".join(pieces) == "".join(lines[:4])  # nothing lost (the blank line is no sentence)
    assert pieces[:3] == ["short line", "word word word", " word word word"]  # before a space
    assert pieces[5:11] == ["日本語日本", "語日本語日", "本語日本語", "日本語日本", "語日本語日", "本語日本語"]


def test_saving_beside_data_refuses_the_same_tokenizer_with_another_eos(tmp_path):
    """--eos-token changes only the metadata, not the files the fingerprint covers: the directory kept the
    first run's end token and a second megakv-prep said "nothing to do" (the documents ended otherwise)."""
    source = _hf_tokenizer(tmp_path / "hf")
    _, first = save_beside_data(source, tmp_path / "data")
    assert first.eos_id == 1
    assert save_beside_data(source, tmp_path / "data")[1] == first  # the same again: fine
    with pytest.raises(DataError, match=r"other special tokens \(eos 1.*\) than .* gives now \(eos 0") as refused:
        save_beside_data(source, tmp_path / "data", eos_token="<unk>")
    assert f"--tokenizer {tmp_path / 'data' / 'tokenizer'}" in refused.value.fix
    assert read_info(tmp_path / "data" / "tokenizer") == first
    assert save_beside_data(tmp_path / "data" / "tokenizer", tmp_path / "data")[1] == first  # the fix works


def test_a_run_directorys_tokenizer_copy_follows_the_data(tmp_path, tokenizer_dir):
    """A run started again in the directory of a run stopped before its first checkpoint, on data made with
    another tokenizer, kept the first tokenizer: its export decoded the new model's ids with the wrong one."""
    from megakv.data.tokenizer import refresh_copy

    other = tmp_path / "other"
    train_sentencepiece(synthetic_documents(60, seed=3), other, vocab_size=360)
    target = tmp_path / "run" / "tokenizer"
    target.parent.mkdir()
    refresh_copy(tokenizer_dir, target)
    assert read_info(target) == read_info(tokenizer_dir)
    refresh_copy(other, target)
    assert read_info(target) == read_info(other)
    assert load_tokenizer(target).encode("speaks") == load_tokenizer(other).encode("speaks")
    (target / METADATA_FILE).write_text("{")  # a damaged copy is replaced too
    refresh_copy(tokenizer_dir, target)
    assert read_info(target) == read_info(tokenizer_dir)
    assert sorted(p.name for p in target.parent.iterdir()) == ["tokenizer"]  # no temporary left behind


def test_info_on_a_hugging_face_directory_shows_how_megakv_reads_it(tmp_path, capsys):
    """`megakv-tokenizer info` on an imported model's tokenizer/ (transformers files, no megakv metadata) said
    'megakv_tokenizer.json not found' although prep, train and eval all read that directory."""
    from megakv.cli.tokenizer import main

    source = _hf_tokenizer(tmp_path / "hf")
    assert main(["info", str(source)]) == 0
    out, err = capsys.readouterr()
    shown = json.loads(out)
    assert (shown["kind"], shown["vocab_size"], shown["eos_id"]) == ("huggingface", 400, 1)
    assert "is a Hugging Face tokenizer directory" in err and "megakv-tokenizer import" in err
    assert main(["info", str(tmp_path / "nothing")]) == 2  # not a tokenizer at all: still an error
