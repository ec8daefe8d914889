"""megakv vs transformers: same weights, same logits (all-own plan), and exact weight round trips."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file
from tqdm import tqdm

from megakv.cli.convert import main as convert_main
from megakv.hf.checkpoint import load_hf_checkpoint
from megakv.hf.mapping import HF_CLASSES, model_config_from_hf, state_dict_from_hf, state_dict_to_hf
from megakv.model import MegaKVModel
from megakv.model_dir import WEIGHTS_FILE, load_model

VOCAB = 97


def tiny_hf_model(family: str, n_kv_heads: int, tied: bool, **extra) -> torch.nn.Module:
    config_class, model_class = (getattr(transformers, name) for name in HF_CLASSES[family])
    kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=n_kv_heads, max_position_embeddings=64,
                  tie_word_embeddings=tied, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    if family == "qwen3":
        kwargs["head_dim"] = 24  # Qwen3 decouples head_dim from hidden_size / heads
    if family == "mistral":
        kwargs["sliding_window"] = None
    kwargs.update(extra)
    torch.manual_seed(0)
    model = model_class(config_class(**kwargs)).float().eval()
    # Randomise every parameter (norm weights and biases too) so a mis-mapped tensor cannot hide.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.05 * torch.randn_like(p))
    return model


def megakv_from_hf(hf_model) -> MegaKVModel:
    cfg = model_config_from_hf(hf_model.config.to_dict())
    model = MegaKVModel(cfg).eval()
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), cfg), strict=True)
    return model


CASES = [
    pytest.param(family, kv, tied, id=f"{family}-{ {1: 'mqa', 2: 'gqa', 4: 'mha'}[kv]}-{'tied' if tied else 'untied'}")
    for family in HF_CLASSES for kv, tied in ((2, False), (4, True), (1, False))
]


@pytest.mark.parametrize("family,n_kv_heads,tied", CASES)
def test_logits_match_transformers(family, n_kv_heads, tied):
    hf_model = tiny_hf_model(family, n_kv_heads, tied)
    ours = megakv_from_hf(hf_model)
    ids = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(input_ids=ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5


def test_llama3_rope_scaling_and_attention_bias_match_transformers():
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    hf_model = tiny_hf_model("llama", 2, False, rope_parameters=rope, attention_bias=True)
    ours = megakv_from_hf(hf_model)
    assert ours.cfg.rope_scaling.type == "llama3" and ours.cfg.out_bias and ours.cfg.qkv_bias
    ids = torch.randint(0, VOCAB, (1, 48), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - hf_model(input_ids=ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("family", list(HF_CLASSES))
def test_state_dict_round_trip_is_exact(family):
    hf_model = tiny_hf_model(family, 2, False)
    ours = megakv_from_hf(hf_model)
    back = state_dict_to_hf(ours.state_dict(), ours.cfg)
    original = {k: v for k, v in hf_model.state_dict().items() if not k.endswith("inv_freq")}
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key


def test_a_missing_shard_is_named_with_the_fix(tmp_path, capsys):
    """The progress bar's sizing turned a missing shard into a bare '[Errno 2] No such file' (review)."""
    hf_model = tiny_hf_model("llama", 2, False)
    hf_model.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
    assert len(shards) > 1
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "whole")]) == 0  # sharded: read whole
    shards[0].unlink()
    capsys.readouterr()
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{shards[0]} does not exist (model.safetensors.index.json lists it)" in err and "Fix:" in err


def test_convert_cli_round_trip_through_files(tmp_path, capsys):
    hf_model = tiny_hf_model("qwen3", 2, True)
    hf_model.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "mk")]) == 0
    progress = capsys.readouterr().err  # a multi-GB model takes minutes: a bar over the bytes read, then a line
    size = tqdm.format_sizeof((tmp_path / "hf" / "model.safetensors").stat().st_size, divisor=1024)
    assert "reading weights: 100%" in progress and f"{size}/{size}" in progress
    assert f"writing {tmp_path / 'mk'}: done in" in progress
    assert (tmp_path / "mk" / "tokenizer" / "tokenizer_config.json").is_file()
    ours = load_model(tmp_path / "mk")
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids) - hf_model(input_ids=ids).logits).abs().max().item() <= 1e-5

    assert convert_main(["to-hf", str(tmp_path / "mk"), str(tmp_path / "hf2")]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2").float().eval()
    assert type(reloaded).__name__ == "Qwen3ForCausalLM"
    assert (tmp_path / "hf2" / "tokenizer_config.json").is_file()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, hf_model(input_ids=ids).logits)
    # megakv -> HF -> megakv is bit-exact.
    cfg_again, state_again = load_hf_checkpoint(tmp_path / "hf2")
    first = load_file(str(tmp_path / "mk" / WEIGHTS_FILE))
    assert cfg_again == ours.cfg
    assert set(state_again) == set(first)
    assert all(torch.equal(state_again[k], first[k]) for k in first)


def test_convert_refuses_other_architectures(tmp_path, capsys):
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    assert convert_main(["from-hf", str(tmp_path / "gpt2"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "model_type 'gpt2' is not supported" in err
    assert not (tmp_path / "out").exists()


def test_convert_refuses_to_overwrite(tmp_path, capsys):
    hf_model = tiny_hf_model("llama", 2, False)
    hf_model.save_pretrained(tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_a_sliding_window_model_is_imported_with_its_window_as_the_context_and_says_so():
    """megakv has no sliding-window attention: a Mistral whose window is shorter than its positions is imported
    with the window as its context (the two attentions agree within it). The import used to say only 'wrote'."""
    hf = tiny_hf_model("mistral", 2, False, sliding_window=32).config.to_dict()
    with pytest.warns(UserWarning, match="sliding_window 32 < max_position_embeddings 64"):
        assert model_config_from_hf(hf).max_seq_len == 32
    hf["sliding_window"] = None
    assert model_config_from_hf(hf).max_seq_len == 64
