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
from transformers import DynamicCache

from megakv.cli.convert import main as convert_main
from megakv.cli.generate import main as generate_main
from megakv.hf.cache import SharedDepthCache
from megakv.hf.mapping import UnsupportedCheckpoint
from megakv.hf.modeling import MegaKVConfig, MegaKVForCausalLM, export_for_transformers
from megakv.inference.engine import InferenceEngine
from megakv.model_paths import resolve_model
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

    # The cache holds storage for the retained layers only, every position but the last token's.
    assert_cache_holds(returned_cache(generated), retain, batch=3, positions=width + 7)


def returned_cache(generated):
    """The cache generate() returned, under the name the installed transformers uses."""
    cache = getattr(generated, "cache", None)
    return cache if cache is not None else generated.past_key_values


def assert_cache_holds(cache, retain, batch, positions):
    retained = deployment_plan(retain, 6).retained
    assert isinstance(cache, SharedDepthCache) and cache.retained == retained
    assert len(cache.layers) == len(retained)
    assert cache.get_seq_length() == positions
    for entry in cache.layers:
        assert entry.keys.shape == entry.values.shape == (batch, 2, positions, 16)
    assert cache.bytes_held() == 2 * len(retained) * batch * positions * 2 * 16 * 4


@pytest.mark.parametrize("retain", ["every:1", "every:2", "every:3", "0,4", "0,1,5"])
@pytest.mark.parametrize("padded", [False, True])
def test_generate_step_logits_equal_one_full_forward(exported, retain, padded):
    """Each step's logits in generate() equal the logits of one forward pass over the final sequence."""
    _, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, retain=retain).eval()
    prompts = [[5, 6, 7, 8, 9, 10], [11, 12, 13]] if padded else [[5, 6, 7, 8, 9, 10], [21, 22, 23, 24, 25, 26]]
    width, new = max(map(len, prompts)), 16
    ids = torch.tensor([[PAD_ID] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    generated = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                            pad_token_id=PAD_ID, eos_token_id=None, return_dict_in_generate=True,
                            output_logits=True)
    step_logits = torch.stack(generated.logits, dim=1)  # (batch, new, vocab)
    full_mask = torch.cat([mask, torch.ones(len(prompts), new, dtype=mask.dtype)], dim=1)
    with torch.no_grad():
        full = hf(input_ids=generated.sequences, attention_mask=full_mask, use_cache=False).logits
    assert (step_logits - full[:, width - 1:-1]).abs().max().item() <= 1e-5
    assert_cache_holds(returned_cache(generated), retain, batch=len(prompts), positions=width + new - 1)


@pytest.mark.parametrize("name", ["past_key_values", "cache"])
def test_manual_decode_loop_takes_the_cache_under_either_name(exported, name):
    model, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, retain="every:2").eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = model(ids, plan=deployment_plan("every:2", 6))
        first = hf(input_ids=ids[:, :5], use_cache=True)
        cache = returned_cache(first)
        steps = [first.logits]
        for position in range(5, 9):
            step = hf(input_ids=ids[:, position:position + 1], use_cache=True, **{name: cache})
            assert returned_cache(step) is cache
            steps.append(step.logits)
    assert (torch.cat(steps, dim=1) - expected).abs().max().item() <= 1e-5
    assert cache.get_seq_length() == 9 and len(cache.layers) == 3


def test_a_filled_foreign_cache_is_refused(exported):
    _, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    foreign = DynamicCache()
    foreign.update(torch.zeros(1, 2, 3, 16), torch.zeros(1, 2, 3, 16), 0)
    with pytest.raises(ValueError, match="megakv models keep their own cache"):
        hf(input_ids=torch.tensor([[5]]), past_key_values=foreign)
    first = hf(input_ids=torch.tensor([[5, 6]]), use_cache=True)
    hf.config.retain = "all"
    with pytest.raises(ValueError, match="config.retain changed mid-generation"):
        hf(input_ids=torch.tensor([[7]]), past_key_values=returned_cache(first))


def test_outputs_the_wrapper_cannot_give_are_refused_and_return_dict_false_gives_a_tuple(exported):
    """output_hidden_states / output_attentions were swallowed (hidden_states None, no error) and return_dict=False
    still returned an output object; transformers' Llama gives a tuple."""
    _, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        for option in ("output_hidden_states", "output_attentions"):
            with pytest.raises(ValueError, match=f"{option}=True is not supported"):
                hf(input_ids=ids, **{option: True})
            with pytest.raises(ValueError, match=f"{option}=True is not supported"):
                hf.generate(ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                            **{option: True})
        as_object = hf(input_ids=ids, use_cache=False)
        as_tuple = hf(input_ids=ids, use_cache=False, return_dict=False)
        with_labels = hf(input_ids=ids, labels=ids, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], as_object.logits)
    assert len(with_labels) == 2 and with_labels[0].dim() == 0 and torch.equal(with_labels[1], as_object.logits)


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


@pytest.mark.slow  # a new interpreter importing torch + transformers
def test_a_saved_copy_of_a_loaded_model_loads_like_the_export(exported, tmp_path):
    """save_pretrained of a loaded model wrote config.json with auto_map but no loader shim, so a fresh process
    could not load it with trust_remote_code; after a trust_remote_code load it copied megakv's whole modeling
    module into the directory instead (HF audit). Both now write the shim, and the retain chosen at load is kept."""
    _, out = exported
    saved = tmp_path / "saved"
    transformers.AutoModelForCausalLM.from_pretrained(out, retain="every:3").save_pretrained(saved)
    code = ("import json, pathlib, sys, transformers; d = pathlib.Path(sys.argv[1]); "
            "m = transformers.AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True); "
            "print(type(m).__module__, m.config.retain); m.save_pretrained(d / 'again'); "
            "print(sorted(p.name for p in (d / 'again').glob('*.py')), "
            "json.loads((d / 'again' / 'config.json').read_text())['auto_map']['AutoModelForCausalLM']); "
            "again = transformers.AutoModelForCausalLM.from_pretrained(d / 'again', trust_remote_code=True); "
            "print(again.config.retain)")
    result = subprocess.run([sys.executable, "-c", code, str(saved)], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines() == ["megakv.hf.modeling every:3",
                                          "['modeling_megakv.py'] modeling_megakv.MegaKVForCausalLM", "every:3"]


def test_save_pretrained_refuses_a_retain_beyond_the_models_depth(exported, tmp_path):
    """every:7 on 6 layers loads (an evaluation may sweep every:K) but was saved as the stored default, which
    to-hf-rcla refuses: it silently means layer 0 alone."""
    _, out = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(out, retain="every:7")
    with pytest.raises(ValueError, match="K must be at most the model's 6 layers"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()


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


def test_the_transformers_config_defaults_are_model_configs():
    """MegaKVConfig repeats ModelConfig's defaults by hand (transformers reads them from its class body): a
    default changed on one side only would make a config.json without that key mean another model."""
    import dataclasses

    from megakv.config import ModelConfig

    converted, expected = MegaKVConfig().to_model_config(), ModelConfig()
    for field in dataclasses.fields(ModelConfig):
        assert getattr(converted, field.name) == getattr(expected, field.name), field.name
    assert converted == expected
    assert MegaKVConfig.from_model_config(expected).to_model_config() == expected
