"""Importing transformers checkpoints as transformers itself reads them: rope settings, tied heads and sliding
windows as transformers 5 resolves them, generation defaults kept through a round trip, tokenizers without an
eos token or with a chosen one, tokenizer copies that never follow a link out, and a config that does not fit
its weights refused before a model is built. Real tiny transformers models saved with save_pretrained, real
megakv CLI mains."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import warnings

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from megakv.cli.convert import main as convert_main
from megakv.cli.eval import main as eval_main
from megakv.cli.generate import main as generate_main
from megakv.cli.prep import main as prep_main
from megakv.data.errors import DataError
from megakv.hf.checkpoint import load_hf_checkpoint
from megakv.hf.mapping import HF_CLASSES, model_config_from_hf
from megakv.model_dir import load_model, model_from_state_dict

VOCAB = 300
TEXT = "The quick brown fox jumps over the lazy dog. 0123456789 hello world, and again. "
SAMPLING = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.8, "repetition_penalty": 1.05}


def hf_model(family: str, **extra) -> torch.nn.Module:
    config_class, model_class = (getattr(transformers, name) for name in HF_CLASSES[family])
    kwargs = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    kwargs.update(extra)
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs)).float().eval()
    with torch.no_grad():  # every weight random, so a mis-mapped or dropped tensor shows in the logits
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return model


def hf_tokenizer(directory, eos: bool = True):
    """A byte-level BPE transformers tokenizer of VOCAB ids: <|endoftext|> (its eos, unless eos=False), then the
    chat tokens <|im_start|> <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 20], trainer)
    specials = {"eos_token": "<|endoftext|>"} if eos else {}
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(str(directory))
    return directory


def logits_diff(megakv_model, hf_dir) -> float:
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return (megakv_model.eval()(ids) - reference(input_ids=ids).logits).abs().max().item()


def edit_json(path, **changes) -> dict:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data))
    return data


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny Llama transformers directory with its tokenizer and an instruct model's sampling defaults."""
    directory = tmp_path_factory.mktemp("hf") / "llama"
    hf_model("llama").save_pretrained(directory)
    hf_tokenizer(directory)
    edit_json(directory / "generation_config.json", **SAMPLING)
    return directory


@pytest.fixture(scope="module")
def imported(llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mk") / "llama"
    assert convert_main(["from-hf", str(llama_dir), str(out)]) == 0
    return out


# ------------------------------------------------------------------------------------------ config.json reading


def test_rope_scaling_beside_rope_parameters_is_what_transformers_applies(tmp_path, capsys):
    """A config.json with transformers 5's rope_parameters and a rope_scaling entry (added for context
    extension): transformers applies rope_scaling, whole (rope_parameters' theta goes too); megakv read
    rope_parameters and silently ignored it (a linear factor 4 went unnoticed)."""
    hf_dir = tmp_path / "hf"
    hf_model("llama").save_pretrained(hf_dir)
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 16}
    edit_json(hf_dir / "config.json", rope_parameters={"rope_type": "default", "rope_theta": 1e6}, rope_scaling=llama3)
    applied = transformers.AutoConfig.from_pretrained(hf_dir).rope_parameters
    assert applied["rope_type"] == "llama3" and applied["rope_theta"] == 10000.0  # transformers' precedence

    cfg, state = load_hf_checkpoint(hf_dir)
    assert (cfg.rope_scaling.type, cfg.rope_theta) == ("llama3", 10000.0)
    assert logits_diff(model_from_state_dict(cfg, state), hf_dir) <= 1e-5

    # A kind megakv cannot compute is refused when it comes through rope_scaling too.
    edit_json(hf_dir / "config.json", rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert convert_main(["from-hf", str(hf_dir), str(tmp_path / "mk")]) == 2
    assert "rope type 'linear' (rope_scaling" in capsys.readouterr().err
    assert not (tmp_path / "mk").exists()


def test_an_lm_head_of_its_own_is_used_although_tie_word_embeddings_is_true(tmp_path):
    """transformers ties only when the checkpoint's lm_head equals the embedding; megakv dropped a different one
    and tied, so its logits were not the checkpoint's."""
    hf_dir = tmp_path / "hf"
    hf_model("qwen2", tie_word_embeddings=True).save_pretrained(hf_dir)
    weights = load_file(hf_dir / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an lm_head equal to the embedding stays tied, without a word
        assert convert_main(["from-hf", str(hf_dir), str(tmp_path / "equal")]) == 0
    assert load_model(tmp_path / "equal").cfg.tie_embeddings

    weights["lm_head.weight"] = 0.05 * torch.randn_like(weights["lm_head.weight"])
    save_file(weights, hf_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="tie_word_embeddings=true, but the weights hold their own lm_head"):
        assert convert_main(["from-hf", str(hf_dir), str(tmp_path / "own")]) == 0
    ours = load_model(tmp_path / "own")
    assert not ours.cfg.tie_embeddings
    assert logits_diff(ours, hf_dir) <= 1e-5


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_a_config_json_without_sliding_window_has_transformers_default_window(family):
    """MistralConfig (and Qwen2/Qwen3 with use_sliding_window) default sliding_window to 4096; megakv read a
    missing key as "no window" and its logits left transformers' past position 4096."""
    extra = {"use_sliding_window": True, "max_window_layers": 1} if family != "mistral" else {}  # layer 1 slides
    hf = hf_model(family, max_position_embeddings=8192, **extra).config.to_dict()
    hf.pop("sliding_window")
    config_class = getattr(transformers, HF_CLASSES[family][0])
    assert config_class.from_dict(hf).sliding_window == 4096  # what transformers reads
    with pytest.warns(UserWarning, match="sliding_window 4096 < max_position_embeddings 8192"):
        assert model_config_from_hf(hf).max_seq_len == 4096
    assert model_config_from_hf({**hf, "sliding_window": None}).max_seq_len == 8192  # null: no window


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_use_sliding_window_with_no_sliding_layer_keeps_the_full_context(family, tmp_path):
    """Qwen2/Qwen3 slide only the layers at index >= max_window_layers (or those layer_types names
    "sliding_attention"); with use_sliding_window=true and no such layer transformers attends over the whole
    context, yet megakv cut it to sliding_window (and warned). Windows of 16 tokens, logits over 48."""
    hf_dir = tmp_path / "hf"
    hf_model(family, use_sliding_window=True, sliding_window=16, max_window_layers=2).save_pretrained(hf_dir)
    hf = json.loads((hf_dir / "config.json").read_text())
    assert hf["layer_types"] == ["full_attention"] * 2  # save_pretrained writes them; they decide when present
    bare = {key: value for key, value in hf.items() if key != "layer_types"}  # max_window_layers decides
    for config in (hf, bare, {**bare, "max_window_layers": 5}, {**hf, "max_window_layers": 0}):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing is cut, so nothing to warn about
            assert model_config_from_hf(config).max_seq_len == 64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg, state = load_hf_checkpoint(hf_dir)
    assert logits_diff(model_from_state_dict(cfg, state), hf_dir) <= 1e-5  # 48 tokens, beyond the window

    # One sliding layer (by max_window_layers, or named in layer_types): the context is the window, and past it
    # transformers' logits are not megakv's full attention.
    for config in ({**bare, "max_window_layers": 1}, {**hf, "layer_types": ["full_attention", "sliding_attention"]}):
        with pytest.warns(UserWarning, match="sliding_window 16 < max_position_embeddings 64"):
            assert model_config_from_hf(config).max_seq_len == 16
    edit_json(hf_dir / "config.json", max_window_layers=1, layer_types=...)
    assert transformers.AutoConfig.from_pretrained(hf_dir).layer_types == ["full_attention", "sliding_attention"]
    with pytest.warns(UserWarning, match="sliding_window 16"):
        cfg, state = load_hf_checkpoint(hf_dir)
    cfg.max_seq_len = 64
    assert logits_diff(model_from_state_dict(cfg, state), hf_dir) > 1e-3
    # use_sliding_window=false: layer_types' "sliding_attention" gets no window in transformers.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model_config_from_hf({**hf, "use_sliding_window": False, "layer_types":
                                     ["sliding_attention"] * 2}).max_seq_len == 64


# ------------------------------------------------------------------------------------------------ round trips


def test_generation_defaults_survive_from_hf_then_to_hf(imported, tmp_path):
    """An instruct model's sampling defaults (generation_config.json) were dropped by from-hf, so generate() on
    the export decoded greedily; both export kinds now carry them, with megakv's token ids."""
    import megakv.hf.modeling  # noqa: F401  (registers model_type "megakv" for the to-hf-rcla export)

    assert convert_main(["to-hf", str(imported), str(tmp_path / "hf")]) == 0
    assert convert_main(["to-hf-rcla", str(imported), str(tmp_path / "rcla")]) == 0
    for export in ("hf", "rcla"):
        generation = transformers.GenerationConfig.from_pretrained(tmp_path / export)
        assert {key: getattr(generation, key) for key in SAMPLING} == SAMPLING, export
        assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (1, 2, 0)

    # Settings transformers loads with a warning but GenerationConfig.save_pretrained refuses (a temperature
    # without do_sample, as on many Hub models) are kept as they are, not a failed export.
    hub_like = tmp_path / "hub_like"
    shutil.copytree(imported, hub_like)
    edit_json(hub_like / "generation_config.json", do_sample=...)
    assert convert_main(["to-hf", str(hub_like), str(tmp_path / "hub_like_hf")]) == 0
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "hub_like_hf").temperature == 0.7


@pytest.mark.parametrize("tied", [False, True])
def test_a_to_hf_rcla_export_imports_back_into_its_model_directory(imported, tmp_path, capsys, tied):
    """A to-hf-rcla export (model_type "megakv") given to from-hf was "not supported: megakv imports llama,
    ...", and as checkpoint.init_from the error said to run that same from-hf. It holds megakv's own model, so
    from-hf now gives back the model directory it was exported from (config, weights, tokenizer and sampling
    defaults equal); the stored plan is a deployment choice, said and not kept. init_from names that command."""
    from megakv.config import ConfigError, load_config
    from megakv.model_dir import load_model_config, read_safetensors

    source = imported
    if tied:  # a tied Qwen2 model (q/k/v bias) without a generation_config.json
        hf_model("qwen2", tie_word_embeddings=True).save_pretrained(tmp_path / "qwen2")
        (tmp_path / "qwen2" / "generation_config.json").unlink()
        assert convert_main(["from-hf", str(tmp_path / "qwen2"), str(tmp_path / "source")]) == 0
        source = tmp_path / "source"
    rcla = tmp_path / "rcla"
    assert convert_main(["to-hf-rcla", str(source), str(rcla), "--retain", "every:2"]) == 0
    config = tmp_path / "finetune.yaml"
    config.write_text("routing:\n  strategy: none\n")
    with pytest.raises(ConfigError, match=f"Fix: import it first: megakv-convert from-hf {rcla} MODEL_DIR"):
        load_config(config, [f"checkpoint.init_from={rcla}", f"train.run_dir={tmp_path / 'run'}"])
    capsys.readouterr()

    back = tmp_path / "back"
    assert convert_main(["from-hf", str(rcla), str(back)]) == 0
    err = capsys.readouterr().err
    assert "stores the deployment plan retain=every:2" in err and "the plan is not kept" in err, err
    assert load_model_config(back) == load_model_config(source)
    ours, theirs = read_safetensors(back / "model.safetensors"), read_safetensors(source / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert sorted(p.name for p in back.iterdir()) == sorted(p.name for p in source.iterdir())
    for name in [p.name for p in (source / "tokenizer").iterdir()] if not tied else []:
        assert (back / "tokenizer" / name).read_bytes() == (source / "tokenizer" / name).read_bytes(), name
    if not tied:
        kept = json.loads((back / "generation_config.json").read_text())
        assert {key: kept[key] for key in SAMPLING} == SAMPLING
    assert load_config(config, [f"checkpoint.init_from={back}", f"train.run_dir={tmp_path / 'run'}"]).model == \
        load_model_config(source)


# ------------------------------------------------------------------------------------------------- tokenizers


def test_finetuning_on_data_prepared_with_another_eos_token_of_the_models_tokenizer_is_accepted(
        imported, llama_dir, tmp_path):
    """`megakv-prep --eos-token '<|im_end|>'` with the imported model's own tokenizer: the data's token ids are
    the model's, yet the launch was refused as "another tokenizer" (the eos ids were compared)."""
    from megakv.config import ConfigError, load_config
    from megakv.train.preflight import check_init_tokenizer

    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"text": TEXT * (i + 1)}) + "\n" for i in range(8)))

    def data_with(tokenizer, name, *extra):
        assert prep_main(["--input", str(corpus), "--tokenizer", str(tokenizer), "--output-prefix",
                          str(tmp_path / name / "train"), "--no-progress", *extra]) == 0
        config = tmp_path / "finetune.yaml"
        config.write_text("routing:\n  strategy: none\n")
        return load_config(config, [f"checkpoint.init_from={imported}", f"data.datasets=[{tmp_path / name / 'train'}]",
                                    f"train.run_dir={tmp_path / 'run'}"])

    check_init_tokenizer(data_with(llama_dir, "chat", "--eos-token", "<|im_end|>"))
    with pytest.raises(ConfigError, match="trained with the tokenizer"):  # a different vocabulary still is refused
        check_init_tokenizer(data_with(_other_tokenizer(tmp_path / "other"), "other"))


def _other_tokenizer(directory):
    """A tokenizer of VOCAB ids trained on other text: other ids for the same words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["zebra quartz vexing jumpy whisky " * 50], trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(
        str(directory))
    return directory


def test_a_tokenizer_without_eos_token_serves_generation_and_evaluation(tmp_path, capsys):
    """A transformers tokenizer naming no eos_token (config.json has eos_token_id): megakv-generate and
    megakv-eval refused it with "pass --eos-token", a flag they do not have; they now use the model's eos.
    Only megakv-prep needs a document end of the tokenizer, and says so."""
    hf_dir = tmp_path / "hf"
    hf_model("llama").save_pretrained(hf_dir)
    hf_tokenizer(hf_dir, eos=False)
    assert convert_main(["from-hf", str(hf_dir), str(tmp_path / "mk")]) == 0
    text = tmp_path / "text.txt"
    text.write_text(f"{TEXT}\n\n{TEXT}\n")
    for model in (tmp_path / "mk", hf_dir):
        assert generate_main(["--model", str(model), "--prompt", "hello", "--max-new-tokens", "4"]) == 0
        assert eval_main(["--model", str(model), "--data", str(text), "--retain", "all", "--no-progress"]) == 0
    capsys.readouterr()
    assert prep_main(["--input", str(text), "--tokenizer", str(hf_dir), "--output-prefix", str(tmp_path / "d" / "t"),
                      "--no-progress"]) == 2
    assert "--eos-token" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------- links


@pytest.fixture
def secret(tmp_path):
    key = tmp_path / "home" / ".ssh" / "id_ed25519"
    key.parent.mkdir(parents=True)
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    key.chmod(0o600)
    return key


def _holds_secret(directory) -> bool:
    return any(p.is_file() and "PRIVATE KEY" in p.read_text(errors="replace") for p in directory.rglob("*"))


def test_no_tokenizer_copy_follows_a_link_out_of_its_directory(imported, llama_dir, secret, tmp_path, capsys):
    """A received model directory whose tokenizer/README.txt linked to ~/.ssh/id_ed25519 gave exports a
    world-readable copy of the key. Every tokenizer copy (exports, model directories, the copy beside data and
    a run's) now refuses such a link, naming it."""
    from megakv.data.tokenizer import import_hf_tokenizer, refresh_copy, save_beside_data
    from megakv.model_dir import save_model_dir

    received = tmp_path / "received"
    shutil.copytree(imported, received)
    (received / "tokenizer" / "README.txt").symlink_to(secret)
    model = load_model(imported)  # from-checkpoint's path: a model directory gets every file of the tokenizer
    with pytest.raises(DataError, match="README.txt is a link"):
        save_model_dir(model.cfg, model.state_dict(), tmp_path / "copy", tokenizer_dir=received / "tokenizer")
    link = received / "tokenizer" / "tokenizer.json"  # exports copy the transformers tokenizer files only
    link.unlink()
    link.symlink_to(secret)
    for command in ("to-hf", "to-hf-rcla"):
        assert convert_main([command, str(received), str(tmp_path / command)]) == 2
        err = capsys.readouterr().err
        assert f"{link} is a link to {secret}, outside the tokenizer directory" in err, err
        assert not (tmp_path / command).exists()

    megakv_tokenizer = tmp_path / "tok"
    import_hf_tokenizer(llama_dir, megakv_tokenizer)
    (megakv_tokenizer / "README.txt").symlink_to(secret)
    with pytest.raises(DataError, match="README.txt is a link"):
        save_beside_data(megakv_tokenizer, tmp_path / "data")
    with pytest.raises(DataError, match="README.txt is a link"):
        refresh_copy(megakv_tokenizer, tmp_path / "run" / "tokenizer")

    hf_dir = tmp_path / "hf_received"  # a transformers directory: its tokenizer files are what gets copied
    shutil.copytree(llama_dir, hf_dir)
    (hf_dir / "tokenizer.json").unlink()
    (hf_dir / "tokenizer.json").symlink_to(secret)
    assert convert_main(["from-hf", str(hf_dir), str(tmp_path / "mk")]) == 2
    assert "tokenizer.json is a link" in capsys.readouterr().err
    for place in (tmp_path / "data", tmp_path / "run", tmp_path / "mk", tmp_path / "copy"):
        assert not place.exists() or not _holds_secret(place), place


def test_a_hugging_face_cache_snapshot_of_links_into_blobs_imports(llama_dir, tmp_path):
    """The Hugging Face cache keeps a snapshot's files as links into the repository's blobs/ folder: importing
    from a snapshot works, and the model directory gets plain files."""
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for path in llama_dir.iterdir():
        blob = repo / "blobs" / hashlib.sha256(path.read_bytes()).hexdigest()
        shutil.copy(path, blob)
        (snapshot / path.name).symlink_to(os.path.relpath(blob, snapshot))
    assert convert_main(["from-hf", str(snapshot), str(tmp_path / "mk")]) == 0
    copied = sorted((tmp_path / "mk" / "tokenizer").iterdir())
    assert copied and not any(p.is_symlink() for p in copied)
    tokenizer_json = (tmp_path / "mk" / "tokenizer" / "tokenizer.json").read_bytes()
    assert tokenizer_json == (llama_dir / "tokenizer.json").read_bytes()
    assert convert_main(["to-hf", str(tmp_path / "mk"), str(tmp_path / "back")]) == 0


# ------------------------------------------------------------------------------------------ config vs weights


@pytest.mark.parametrize("key, value, message", [
    ("n_layers", "100000000", "the model config says n_layers=100000000, but the weights hold 2 layers"),
    ("vocab_size", "1000000000", "size mismatch: embed.weight is (300, 32), the config implies (1000000000, 32)"),
])
def test_a_config_that_does_not_fit_the_weights_is_refused_before_a_model_is_built(imported, tmp_path, capsys,
                                                                                    key, value, message):
    """config.yaml saying n_layers: 100000000 had megakv-generate build modules for minutes and GBs before
    comparing shapes; the safetensors header is now compared first (a 1e9-row embedding is never allocated)."""
    model = tmp_path / "model"
    shutil.copytree(imported, model)
    config = model / "config.yaml"
    config.write_text("".join(f"{key}: {value}\n" if line.startswith(f"{key}:") else line
                              for line in config.read_text().splitlines(keepends=True)))
    started = time.perf_counter()
    assert generate_main(["--model", str(model), "--prompt-ids", "5 6", "--max-new-tokens", "2"]) == 2
    assert time.perf_counter() - started < 10
    err = capsys.readouterr().err
    assert message in err and "Fix: use the config.yaml the weights were saved with" in err, err
