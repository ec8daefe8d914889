"""Every export kind as a transformers user meets it: generate() equals one full forward, it stops at the
tokenizer's end-of-sequence token, colleagues can read the files, and megakv-generate deploys a to-hf-rcla
directory with the retention from_pretrained uses."""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
import transformers
from test_inference_support import SPECIALS, tiny_model, write_model_dir

from megakv.cli.convert import main as convert_main
from megakv.cli.generate import main as generate_main
from megakv.routing import deployment_plan

EOS_FROM_TOKENIZER = SPECIALS.index("</s>")


@pytest.fixture(scope="module")
def model_without_special_ids(tmp_path_factory):
    """A model whose config leaves bos/eos/pad unset (as megakv-trained ones do): they live in its tokenizer."""
    root = tmp_path_factory.mktemp("exports")
    model = tiny_model(seed=6, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return model, write_model_dir(root, model), root


@pytest.fixture(scope="module")
def exports(model_without_special_ids):
    _, model_dir, root = model_without_special_ids
    assert convert_main(["to-hf", str(model_dir), str(root / "plain")]) == 0
    assert convert_main(["to-hf-rcla", str(model_dir), str(root / "rcla"), "--retain", "0,3"]) == 0
    return {"plain": root / "plain", "rcla": root / "rcla"}


@pytest.mark.parametrize("kind", ["plain", "rcla"])
def test_export_records_the_tokenizers_special_ids(exports, kind):
    for name in ("config.json", "generation_config.json"):
        values = json.loads((exports[kind] / name).read_text())
        assert values["eos_token_id"] == EOS_FROM_TOKENIZER, name
        assert values["bos_token_id"] == SPECIALS.index("<s>") and values["pad_token_id"] == SPECIALS.index("<pad>")


@pytest.mark.parametrize("kind", ["plain", "rcla"])
def test_generate_stops_at_end_of_sequence(exports, kind):
    hf = transformers.AutoModelForCausalLM.from_pretrained(exports[kind]).eval()
    with torch.no_grad():  # make </s> the most likely next token everywhere
        hf.get_output_embeddings().weight[EOS_FROM_TOKENIZER].mul_(0).add_(hf.get_output_embeddings().weight.sum(0))
    out = hf.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=10, do_sample=False)
    new = out[0, 3:].tolist()
    assert EOS_FROM_TOKENIZER in new and len(new) == new.index(EOS_FROM_TOKENIZER) + 1


@pytest.mark.parametrize("kind", ["plain", "rcla"])
def test_generate_equals_one_full_forward_for_every_export_kind(exports, kind):
    hf = transformers.AutoModelForCausalLM.from_pretrained(exports[kind]).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 13, 14]])
    out = hf.generate(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                      return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        full = hf(input_ids=out.sequences, use_cache=False).logits
    assert (torch.stack(out.logits, dim=1) - full[:, 4:-1]).abs().max().item() <= 1e-5


def test_exported_files_follow_the_umask(model_without_special_ids, tmp_path):
    _, model_dir, _ = model_without_special_ids
    old = os.umask(0o022)
    try:
        for command in ("to-hf", "to-hf-rcla"):
            assert convert_main([command, str(model_dir), str(tmp_path / command)]) == 0
    finally:
        os.umask(old)
    for command in ("to-hf", "to-hf-rcla"):
        root = tmp_path / command
        for path in [root, *root.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), (path, oct(mode))


def test_megakv_generate_uses_the_exports_stored_retain(exports, model_without_special_ids, capsys):
    model, _, _ = model_without_special_ids
    args = ["--model", str(exports["rcla"]), "--prompt-ids", "5 6 7", "--max-new-tokens", "5", "--no-eos-stop"]
    assert generate_main([*args, "--stats"]) == 0
    assert "# retained layers: [0, 3]" in capsys.readouterr().out
    assert generate_main(args) == 0
    tokens = [int(t) for t in capsys.readouterr().out.split()]
    hf = transformers.AutoModelForCausalLM.from_pretrained(exports["rcla"]).eval()
    assert hf.config.retain == "0,3"
    expected = hf.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=5, do_sample=False, eos_token_id=None)
    assert tokens == expected[0, 3:].tolist()
    with torch.no_grad():  # and that is the shared-cache function, not the full one
        logits = model(torch.tensor([[5, 6, 7]]), plan=deployment_plan("0,3", 6))
    assert tokens[0] == logits[0, -1].argmax().item()


@pytest.mark.parametrize(("spec", "message"), [("every:9", "at most the model's 6 layers"), ("0,9", "out of range"),
                                                ("2,4", "must include layer 0")])
def test_to_hf_rcla_refuses_a_retain_that_does_not_fit(model_without_special_ids, tmp_path, spec, message, capsys):
    _, model_dir, _ = model_without_special_ids
    assert convert_main(["to-hf-rcla", str(model_dir), str(tmp_path / "out"), "--retain", spec]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
