"""megakv SentencePiece tokenizers exported for transformers: AutoTokenizer loads them offline and gives the
same ids and the same decoded text as megakv's tokenizer, on edge cases and a few hundred KB of prose; model
exports (`megakv-convert to-hf`, `to-hf-rcla`) carry them, and megakv reads an export's tokenizer back."""

from __future__ import annotations

import json
import random
import shutil
import warnings

import pytest
import torch
import transformers
from test_inference_support import write_tokenizer

from megakv.cli.convert import main as convert_main
from megakv.config.model import ModelConfig
from megakv.data.errors import DataError
from megakv.data.tokenizer import (
    METADATA_FILE,
    SPM_MODEL_FILE,
    SentencePieceTokenizer,
    import_hf_tokenizer,
    load_tokenizer,
    read_info,
    train_sentencepiece,
)
from megakv.hf.checkpoint import copy_tokenizer_files
from megakv.hf.tokenizer import SHIM_MODULE, write_hf_tokenizer
from megakv.model import MegaKVModel
from megakv.model_dir import save_model_dir

COMMON = ("the of and to in a is that for it as was with be by on not he I this are or his from at which but have "
          "an they you were her she there one all we their can been has more if no when will would who so what its "
          "out up into them than time only about other could then like these some two may first any my now over "
          "such our man me even most made after also did many before must through back years where much your way "
          "well down should because each just those people how too little state good very make world").split()
SYLLABLES = ("ka lo mi ra ten sol ver an dre qu ist or pha lu ne ban cor el fi gor hu in jo ment tion ly ed ing er "
             "est str ow ach ph th sh ei ou ae").split()
FOREIGN = ("café naïve façade Zürich São niño jalapeño Ærøskøbing déjà-vu crème brûlée Ελλάδα москва 東京 "
           "日本語 中文字 한국어 ß œuvre").split()
RARE = ("🎉", "🚀", "😀", "𝔘𝔫𝔦", "☃", "ℵ", "†", "‰", "©", "™", "€", "£", "¥")


def prose(n_chars: int, seed: int) -> str:
    """English-like text: a Zipf-distributed vocabulary of common and invented words, punctuation, numbers,
    quotes, indented and tabbed lines, runs of spaces, blank lines, accents, other scripts, rare symbols."""
    rng = random.Random(seed)
    invented = sorted({"".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(4000)})
    words = COMMON + invented
    weights = [1 / (rank + 1) for rank in range(len(words))]

    def sentence() -> str:
        ws = rng.choices(words, weights, k=rng.randint(3, 20))
        for i, w in enumerate(ws):
            r = rng.random()
            if r < 0.06:
                ws[i] = w + ","
            elif r < 0.08:
                ws[i] = str(rng.randint(0, 100000))
            elif r < 0.09:
                ws[i] = rng.choice(FOREIGN)
            elif r < 0.095:
                ws[i] = f'"{w}"' if rng.random() < 0.5 else f"({w})"
            elif r < 0.1:
                ws[i] = w + rng.choice(("'s", "n't", "-like", "'ll"))
            elif r < 0.102:
                ws[i] = rng.choice(RARE)
            elif r < 0.11:
                ws[i] = w.upper() if rng.random() < 0.3 else w.capitalize()
        ws[0] = ws[0].capitalize()
        return " ".join(ws) + rng.choice(".....?!;:") + rng.choice(("", "", "", " ", "  "))

    blocks, size = [], 0
    while size < n_chars:
        kind = rng.random()
        if kind < 0.12:  # indented, code-like lines
            block = "\n".join(rng.choice(("    ", "        ", "\t", "\t\t", "  ", "")) + sentence()
                              + rng.choice(("", " = 1", "()", ":", "   ")) for _ in range(rng.randint(2, 6)))
        elif kind < 0.17:  # list
            block = "\n".join(f"{rng.choice(('-', '*', str(i + 1) + '.'))} {sentence()}"
                              for i in range(rng.randint(2, 5)))
        elif kind < 0.19:  # rule lines
            block = rng.choice("-=*#~.") * rng.randint(3, 60)
        else:
            block = "".join(sentence() + rng.choice((" ", " ", "  ", "\n")) for _ in range(rng.randint(2, 9)))
        blocks.append(block)
        size += len(block)
    return "".join(block + rng.choice(("\n\n", "\n\n", "\n", "\n\n\n", "\n \n")) for block in blocks)


EDGE_CASES = [
    "", " ", "  ", "\n", "\n\n", "hello", " hello", "   hello", "hello ", "hello   ", "hello  world",
    "a    b     c", "line one\nline two", "para one\n\npara two\n\n\n\nafter blank lines", "\n  indented\n",
    "trailing newline\n", "\tTab\tseparated\t\tvalues\t", "mixed \t \n \t\n", "\r\nwindows\r\nlines\r\n",
    "Café, naïve façade à la crème brûlée; Ærøskøbing.", "日本語のテキストと中文字", "한국어 문장",
    "Ελληνικά и русский",
    "emoji 🎉🚀 and 😀 rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\u00a0non-breaking\u00a0spaces\u2003em\u2009thin", "zero\u200bwidth",
    "<s> </s> <unk> <pad> are text here", "<0x41> is text too", "\u2581 literal \u2581\u2581 lower eighth blocks",
    "digits 0123456789 and 3.14159, 1,000,000", "punctuation . , ; : ! ? ' \" ( ) [ ] { } -- ...",
    "it 's do n't , he said . \" quoted \" ( paren )", "\x00\x01\x7f control characters",
    "    def f(x):\n        return x  # comment\n", "-" * 80, "=" * 33 + "\n" + " " * 40 + "x",
]


@pytest.fixture(scope="module")
def corpus() -> str:
    return prose(300_000, seed=0)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory, corpus):
    path = tmp_path_factory.mktemp("spm") / "tokenizer"
    train_sentencepiece([corpus], path, vocab_size=2000)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory, spm_dir):
    out = tmp_path_factory.mktemp("hf-tok")
    written = write_hf_tokenizer(spm_dir, out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    return load_tokenizer(spm_dir), hf_tok, out, written


def assert_same(ours, hf_tok, texts: list[str]) -> None:
    got = hf_tok(texts, add_special_tokens=False).input_ids
    for text, ids in zip(texts, got):
        expected = ours.encode(text)
        assert ids == expected, f"ids differ for {text[:80]!r}"
        assert hf_tok.decode(ids) == ours.decode(ids), f"decode differs for {text[:80]!r}"


def test_files_and_special_tokens(pair, spm_dir):
    ours, hf_tok, out, written = pair
    assert written == ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
    assert sorted(p.name for p in out.iterdir()) == sorted(written)  # no model config: no loader shim needed
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert type(hf_tok) is transformers.PreTrainedTokenizerFast
    info = read_info(spm_dir)
    assert len(hf_tok) == info.vocab_size == ours.vocab_size
    assert (hf_tok.unk_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (
        info.unk_id, info.bos_id, info.eos_id, info.pad_id) == (0, 1, 2, 3)
    assert (hf_tok.unk_token, hf_tok.bos_token, hf_tok.eos_token, hf_tok.pad_token) == ("<unk>", "<s>", "</s>", "<pad>")
    # Same piece strings for every id.
    assert hf_tok.convert_ids_to_tokens(list(range(info.vocab_size))) == [
        ours._sp.id_to_piece(i) for i in range(info.vocab_size)]


@pytest.mark.parametrize("text", EDGE_CASES, ids=range(len(EDGE_CASES)))
def test_edge_cases_match(pair, text):
    ours, hf_tok, _, _ = pair
    assert_same(ours, hf_tok, [text])
    ids = ours.encode(text)
    assert hf_tok(text).input_ids == ids  # the default call adds nothing either (no bos, no eos)
    if "\u2581" not in text:  # SentencePiece itself turns a literal "▁" into a space
        assert hf_tok.decode(ids) == text  # lossless, as megakv's tokenizer


def test_byte_fallback_is_exercised(pair):
    ours, hf_tok, _, _ = pair
    ids = ours.encode("emoji 🎉 and 𝔘")
    assert any(ours._sp.is_byte(i) for i in ids)  # rare characters are outside the vocabulary
    assert hf_tok("emoji 🎉 and 𝔘", add_special_tokens=False).input_ids == ids


def test_whole_corpus_and_slices_match(pair, corpus):
    ours, hf_tok, _, _ = pair
    assert hf_tok(corpus, add_special_tokens=False).input_ids == ours.encode(corpus)
    rng = random.Random(1)
    starts = [rng.randrange(len(corpus)) for _ in range(400)]
    assert_same(ours, hf_tok, [corpus[s:s + rng.randint(1, 3000)] for s in starts])


def test_unseen_text_matches(pair):
    ours, hf_tok, _, _ = pair
    text = prose(100_000, seed=7)  # other invented words: longer segmentations, more byte fallback
    assert hf_tok(text, add_special_tokens=False).input_ids == ours.encode(text)
    assert_same(ours, hf_tok, text.split("\n\n"))


def test_random_concatenations_of_pieces_match(pair):
    ours, hf_tok, _, _ = pair
    sp = ours._sp
    pieces = [sp.id_to_piece(i).replace("\u2581", " ") for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_byte(i) or sp.is_unknown(i))]
    rng = random.Random(2)
    texts = ["".join(rng.choices(pieces, k=rng.randint(1, 12))) for _ in range(3000)]
    got = hf_tok(texts, add_special_tokens=False).input_ids
    assert [i for i, (text, ids) in enumerate(zip(texts, got)) if ids != ours.encode(text)] == []


def test_special_ids_decode_as_transformers_does(pair):
    ours, hf_tok, _, _ = pair
    ids = [ours.bos_id, *ours.encode("Hello there."), ours.eos_id, ours.pad_id]
    # SentencePiece drops control tokens; transformers drops them with skip_special_tokens=True.
    assert hf_tok.decode(ids, skip_special_tokens=True) == ours.decode(ids) == "Hello there."
    # Without it the tokens are written, and the dummy prefix's space is then no longer leading.
    assert hf_tok.decode(ids) == "<s> Hello there.</s><pad>"


def test_hugging_face_directories_are_copied(tmp_path):
    plain = write_tokenizer(tmp_path / "plain")
    assert write_hf_tokenizer(plain, tmp_path / "a") == ["tokenizer.json", "tokenizer_config.json"]
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (plain / "tokenizer.json").read_bytes()
    imported = tmp_path / "imported"
    info = import_hf_tokenizer(plain, imported, eos_token="</s>")
    copied = copy_tokenizer_files(imported, tmp_path / "b")
    assert "tokenizer.json" in copied and METADATA_FILE in copied
    assert read_info(tmp_path / "b") == info
    assert load_tokenizer(tmp_path / "b").encode("the cat sat") == load_tokenizer(imported).encode("the cat sat")
    assert copy_tokenizer_files(tmp_path / "missing", tmp_path / "c") == []
    assert copy_tokenizer_files(tmp_path / "a", tmp_path / "d") == ["tokenizer.json", "tokenizer_config.json"]


def test_copy_keeps_the_megakv_tokenizer(spm_dir, tmp_path):
    copied = copy_tokenizer_files(spm_dir, tmp_path)
    assert set(copied) == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", SPM_MODEL_FILE,
                           METADATA_FILE}
    back = load_tokenizer(tmp_path)  # megakv reads the copy as the same SentencePiece tokenizer
    assert isinstance(back, SentencePieceTokenizer) and read_info(tmp_path) == read_info(spm_dir)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)  # tokenizer.model is ignored
    assert type(hf_tok) is transformers.PreTrainedTokenizerFast
    assert hf_tok("  two spaces\n").input_ids == back.encode("  two spaces\n")


def test_models_without_an_exact_equivalent_are_refused(spm_dir, tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    odd = tmp_path / "odd"
    shutil.copytree(spm_dir, odd)
    proto = sentencepiece_model_pb2.ModelProto.FromString((odd / SPM_MODEL_FILE).read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = True
    (odd / SPM_MODEL_FILE).write_bytes(proto.SerializeToString())
    with pytest.raises(DataError, match="remove_extra_whitespaces"):
        write_hf_tokenizer(odd, tmp_path / "out")
    # A model export still carries megakv's own tokenizer files, with a warning.
    with pytest.warns(UserWarning, match="no transformers tokenizer files"):
        assert copy_tokenizer_files(odd, tmp_path / "copy") == [SPM_MODEL_FILE, METADATA_FILE]


def test_unigram_is_close_and_says_so(tmp_path, corpus):
    train_sentencepiece([corpus], tmp_path / "uni", vocab_size=2000, model_type="unigram")
    with pytest.warns(UserWarning, match="unigram"):
        write_hf_tokenizer(tmp_path / "uni", tmp_path / "out")
    ours = load_tokenizer(tmp_path / "uni")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    sentences = [s.strip() + "." for s in corpus.replace("\n", " ").split(".") if "  " not in s.strip()][:300]
    assert_same(ours, hf_tok, sentences)  # prose without runs of spaces: same ids


def tiny_megakv_model(family: str, vocab_size: int) -> MegaKVModel:
    cfg = ModelConfig(family=family, vocab_size=vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_hidden=96, max_seq_len=128, qkv_bias=family == "qwen2", qk_norm=family == "qwen3",
                      bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    return MegaKVModel(cfg).eval()


# qwen2: transformers 5 would load its byte-level Qwen2Tokenizer for that model type; the export routes
# AutoTokenizer to the exported tokenizer.json instead.
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_convert_to_hf_carries_the_tokenizer(tmp_path, spm_dir, family):
    ours = load_tokenizer(spm_dir)
    model = tiny_megakv_model(family, ours.vocab_size)
    model_dir = save_model_dir(model.cfg, model.state_dict(), tmp_path / "model", tokenizer_dir=spm_dir)
    out = tmp_path / "hf"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "AutoTokenizer does not load ..." warning
        assert convert_main(["to-hf", str(model_dir), str(out)]) == 0
    # The loader module is added only where AutoTokenizer would build another class (qwen2 from transformers
    # 5.x on, depending on the release); either way AutoTokenizer must give megakv's ids below.
    has_shim = (out / SHIM_MODULE).with_suffix(".py").exists()
    assert not has_shim or family == "qwen2"
    text = "Some text,  with spaces\n\n\tand a tab, café 🎉 and 東京.\n"
    ids = ours.encode(text)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert hf_tok(text).input_ids == ids and hf_tok.decode(ids) == ours.decode(ids) == text
    if has_shim:  # trust_remote_code=True goes through the two-line loader module: same tokenizer
        remote = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True, trust_remote_code=True)
        assert isinstance(remote, transformers.PreTrainedTokenizerFast) and remote(text).input_ids == ids
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert type(hf_model).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))
        got = hf_model(input_ids=torch.tensor([hf_tok(text).input_ids])).logits
    assert (got - expected).abs().max().item() <= 1e-4
    # megakv reads the export's tokenizer back (tokenizer.model + metadata travel along), also through from-hf.
    assert read_info(out) == read_info(spm_dir) and load_tokenizer(out).encode(text) == ids
    assert convert_main(["from-hf", str(out), str(tmp_path / "back")]) == 0
    assert read_info(tmp_path / "back" / "tokenizer") == read_info(spm_dir)
    assert load_tokenizer(tmp_path / "back" / "tokenizer").encode(text) == ids
    # The export and its import verify as that tokenizer: the transformers files (and the model) beside its
    # tokenizer.model made `megakv-tokenizer info` and a second prep into one data directory say "damaged".
    from megakv.data.tokenizer import save_beside_data, verified_info

    assert verified_info(out) == verified_info(tmp_path / "back" / "tokenizer") == read_info(spm_dir)
    for _ in range(2):
        assert save_beside_data(tmp_path / "back" / "tokenizer", tmp_path / "data")[1] == read_info(spm_dir)
    copied, _ = save_beside_data(out, tmp_path / "data2")  # from the model directory: its tokenizer only
    assert sorted(p.name for p in copied.iterdir()) == [METADATA_FILE, SPM_MODEL_FILE]
    assert save_beside_data(out, tmp_path / "data2")[1] == read_info(spm_dir)


def test_convert_to_hf_rcla_carries_the_tokenizer(tmp_path, spm_dir):
    ours = load_tokenizer(spm_dir)
    model = tiny_megakv_model("llama", ours.vocab_size)
    model_dir = save_model_dir(model.cfg, model.state_dict(), tmp_path / "model", tokenizer_dir=spm_dir)
    assert convert_main(["to-hf-rcla", str(model_dir), str(tmp_path / "out")]) == 0
    text = "Another\n\n  text, naïve 😀.\n"
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "out", local_files_only=True)
    assert hf_tok(text).input_ids == ours.encode(text)
    assert read_info(tmp_path / "out") == read_info(spm_dir)
