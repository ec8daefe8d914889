"""transformers integration: export -> AutoModelForCausalLM -> same logits and greedy tokens as megakv's
engine, a cache holding only the retained layers, `retain` changeable at load time, import of tiny
Llama / Qwen3 checkpoints written by transformers, and clear refusals."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import transformers
from test_inference_support import PAD_ID, VOCAB, tiny_model, write_model_dir
from transformers.cache_utils import DummyLayer

from megakv.cli.convert import main as convert_main
from megakv.cli.generate import main as generate_main
from megakv.hf.mapping import UnsupportedCheckpoint
from megakv.hf.modeling import MegaKVConfig, MegaKVForCausalLM, export_for_transformers
from megakv.inference.engine import InferenceEngine
from megakv.inference.loading import resolve_model
from megakv.routing import deployment_plan


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    model = tiny_model(seed=2)
    model_dir = write_model_dir(root, model)
    out = export_for_transformers(model_dir, root / "hf", retain="every:2")
    return model, out


def test_export_layout(exported):
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "modeling_megakv.py",
            "tokenizer.json", "tokenizer_config.json"} <= names
    config = MegaKVConfig.from_pretrained(out)
    assert config.model_type == "megakv" and config.retain == "every:2"
    assert config.auto_map["AutoModelForCausalLM"] == "modeling_megakv.MegaKVForCausalLM"
    assert config.kv_sharing_modes == [None, "reuse", None, "reuse", None, "reuse"]


@pytest.mark.parametrize("retain", [None, "all", "every:3", "0,1,5"])
def test_auto_model_logits_equal_megakv(exported, retain):
    model, out = exported
    kwargs = {} if retain is None else {"retain": retain}
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, **kwargs).eval()
    assert isinstance(hf, MegaKVForCausalLM)
    expected_retain = retain or "every:2"
    assert hf.config.retain == expected_retain
    ids = torch.randint(0, VOCAB, (2, 13), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = hf(input_ids=ids, use_cache=False).logits
        expected = model(ids, plan=deployment_plan(expected_retain, 6))
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("retain", ["all", "every:2", "0,4"])
def test_transformers_generate_equals_megakv_engine(exported, retain):
    model, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, retain=retain).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13], [14]]
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    generated = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                            pad_token_id=PAD_ID, eos_token_id=None, return_dict_in_generate=True)
    ours = InferenceEngine(model, retain).generate(prompts, max_new_tokens=8, pad_id=PAD_ID)
    assert generated.sequences[:, width:].tolist() == ours.tokens

    # transformers' cache holds storage for the retained layers only.
    retained = deployment_plan(retain, 6).retained
    cache = generated.past_key_values
    for layer, entry in enumerate(cache.layers):
        if layer in retained:
            assert entry.keys.shape == (3, 2, width + 7, 16)
        else:
            assert isinstance(entry, DummyLayer) and entry.keys is None


def test_hf_forward_skips_kv_projections_of_non_retained_layers(exported):
    _, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, retain="0,3").eval()
    ran = set()
    handles = [layer.attn.k_proj.register_forward_hook(lambda *_, i=i: ran.add(i))
               for i, layer in enumerate(hf.model.layers)]
    hf.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False, pad_token_id=PAD_ID)
    for handle in handles:
        handle.remove()
    assert ran == {0, 3}


def test_retain_is_validated_at_load_time(exported):
    _, out = exported
    with pytest.raises(ValueError, match="must include layer 0"):
        transformers.AutoModelForCausalLM.from_pretrained(out, retain="2,4")
    with pytest.raises(ValueError, match="out of range"):
        transformers.AutoModelForCausalLM.from_pretrained(out, retain="0,9")


@pytest.mark.slow  # a new interpreter importing torch + transformers: ~12 s idle, up to ~40 s on a busy machine
def test_fresh_process_loads_export_through_auto_map(exported):
    _, out = exported
    code = ("import transformers; m = transformers.AutoModelForCausalLM.from_pretrained("
            f"{str(out)!r}, trust_remote_code=True, retain='every:3'); "
            "print(type(m).__module__, m.config.retain)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "megakv.hf.modeling every:3" in result.stdout


def test_convert_cli_to_hf_rcla(tmp_path):
    model = tiny_model(seed=3, tie_embeddings=True)
    model_dir = write_model_dir(tmp_path, model)
    assert convert_main(["to-hf-rcla", str(model_dir), str(tmp_path / "out"), "--retain", "every:3"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert hf.config.retain == "every:3"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - model(ids, plan=deployment_plan("every:3", 6))).abs().max() <= 1e-5
    # the exported directory is also a model path for megakv's own tools
    again, tokenizer_dir = resolve_model(tmp_path / "out")
    assert tokenizer_dir == tmp_path / "out"
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def _tiny_hf_checkpoint(family: str, path):
    config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                 "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM)}[family]
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if family == "qwen3":
        kwargs["head_dim"] = 24
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs)).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_import_transformers_checkpoint_then_generate(tmp_path, family, capsys):
    hf_model = _tiny_hf_checkpoint(family, tmp_path / "ckpt")
    model, tokenizer_dir = resolve_model(tmp_path / "ckpt")
    assert tokenizer_dir is None and model.cfg.family == family and model.cfg.n_layers == 4
    prompt = [5, 6, 7, 8, 9]
    ours = InferenceEngine(model, "all").generate([prompt], max_new_tokens=6)
    theirs = hf_model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
    assert ours.tokens[0] == theirs[0, len(prompt):].tolist()
    shared = InferenceEngine(model, "every:2").generate([prompt], max_new_tokens=6)
    assert len(shared.tokens[0]) == 6 and shared.stats.retained == (0, 2)
    assert generate_main(["--model", str(tmp_path / "ckpt"), "--prompt-ids", "5 6 7 8 9", "--retain", "every:2",
                          "--max-new-tokens", "6", "--no-eos-stop"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in shared.tokens[0]]


def test_other_architectures_are_refused(tmp_path):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UnsupportedCheckpoint, match="model_type 'gpt2' is not supported"):
        resolve_model(tmp_path / "gpt2")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a model: expected a megakv model directory"):
        resolve_model(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "missing")


def test_labels_give_the_shifted_cross_entropy(exported):
    model, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        loss = hf(input_ids=ids, labels=ids, use_cache=False).loss
        logits = model(ids, plan=deployment_plan("every:2", 6))
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert torch.allclose(loss, expected, atol=1e-6)


def test_retain_can_change_after_loading(exported):
    model, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, VOCAB, (1, 7), generator=torch.Generator().manual_seed(9))
    for retain in ("0,2", "all"):
        hf.config.retain = retain
        with torch.no_grad():
            got = hf(input_ids=ids).logits
        assert (got - model(ids, plan=deployment_plan(retain, 6))).abs().max().item() <= 1e-5
