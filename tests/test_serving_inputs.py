"""Serving-side inputs: bf16 RoPE, configs transformers would read differently, damaged transformers
directories, --device / --threads, a list of eos ids, and eval options that do not apply to --task qa."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import transformers
from test_hf_parity import tiny_hf_model
from test_inference_support import EOS_ID, tiny_config, tiny_model, write_indexed_split, write_model_dir

from megakv.cli.convert import main as convert_main
from megakv.cli.eval import main as eval_main
from megakv.cli.generate import main as generate_main
from megakv.cli.plan import main as plan_main
from megakv.config import ConfigError
from megakv.config.devices import resolve_device
from megakv.inference.engine import InferenceEngine
from megakv.model_dir import model_from_state_dict, save_model_dir
from megakv.model_paths import resolve_model

MISSING_DEVICE = "cuda:99" if torch.cuda.is_available() else "cuda"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("serving"), tiny_model(seed=6))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_indexed_split(tmp_path_factory.mktemp("data") / "val", n_docs=8, doc_len=30)


@pytest.fixture(scope="module")
def hf_dir(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "hf"
    assert convert_main(["to-hf", str(model_dir), str(out)]) == 0
    return out


def _copy_dir(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


# --- 1. RoPE frequencies stay fp32 under --dtype bfloat16 / float16 ---

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_keeps_its_rope_frequencies_fp32(dtype):
    model = tiny_model()
    cast = model_from_state_dict(model.cfg, model.state_dict(), "cpu", dtype)
    assert cast.embed.weight.dtype == dtype
    assert cast.rope.inv_freq.dtype == torch.float32
    assert torch.equal(cast.rope.inv_freq, model.rope.inv_freq)
    # nor does a plain module cast and back
    assert torch.equal(tiny_model().to(dtype).float().rope.inv_freq, model.rope.inv_freq)


def test_bf16_logits_at_late_positions_are_as_close_to_fp32_as_transformers_bf16(tmp_path):
    hf = tiny_hf_model("llama", 2, False, max_position_embeddings=1024)
    with torch.no_grad():  # sharper attention, so positions matter
        for name, p in hf.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(8)
    hf.save_pretrained(tmp_path)
    ids = torch.randint(3, 97, (1, 600), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(input_ids=ids).logits.float()
        hf_bf16 = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        ours, _ = resolve_model(tmp_path, "cpu", torch.bfloat16)
        late = slice(400, 600)
        theirs_error = (hf_bf16(input_ids=ids).logits.float() - reference)[:, late].abs().mean()
        our_error = (ours(ids).float() - reference)[:, late].abs().mean()
    # bf16 frequencies made this about twice transformers' error
    assert our_error <= 1.1 * theirs_error


# --- 2. qwen3 always has q/k norm ---

def test_qwen3_without_qk_norm_is_refused(tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"model.qk_norm.*qwen3 always has q/k norm.*Fix: set qk_norm=true"):
        tiny_config(family="qwen3", qk_norm=False).validate()
    model = tiny_model(family="qwen3", qk_norm=True)
    save_model_dir(model.cfg, model.state_dict(), tmp_path / "m")
    config = tmp_path / "m" / "config.yaml"  # a model directory written before the check
    config.write_text(config.read_text().replace("qk_norm: true", "qk_norm: false"))
    assert convert_main(["to-hf", str(tmp_path / "m"), str(tmp_path / "hf")]) == 2
    assert "qwen3 always has q/k norm" in _error(capsys)
    assert not (tmp_path / "hf").exists()


# --- 3. damaged transformers inputs are one clear error, exit 2 ---

def _truncate(path: Path, size: int = 1000) -> None:
    path.write_bytes(path.read_bytes()[:size])


def test_a_truncated_hf_safetensors_is_named(hf_dir, tmp_path, capsys):
    broken = _copy_dir(hf_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    _truncate(weights)
    assert generate_main(["--model", str(broken), "--prompt-ids", "5 6"]) == 2
    err = _error(capsys)
    assert f"{weights}: truncated or corrupt safetensors file" in err and "Fix:" in err
    assert convert_main(["from-hf", str(broken), str(tmp_path / "out")]) == 2
    assert f"{weights}: truncated or corrupt safetensors file" in _error(capsys)


def test_to_hf_of_a_truncated_model_dir_is_named(model_dir, tmp_path, capsys):
    broken = _copy_dir(model_dir, tmp_path / "broken")
    _truncate(broken / "model.safetensors")
    assert convert_main(["to-hf", str(broken), str(tmp_path / "out")]) == 2
    err = _error(capsys)
    assert f"{broken / 'model.safetensors'}: truncated or corrupt safetensors file" in err
    assert "Fix: copy the model directory again" in err


def test_a_config_json_without_a_required_key_is_named(hf_dir, tmp_path, capsys):
    broken = _copy_dir(hf_dir, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    del config["num_attention_heads"]
    (broken / "config.json").write_text(json.dumps(config))
    assert convert_main(["from-hf", str(broken), str(tmp_path / "out")]) == 2
    err = _error(capsys)
    assert f"{broken / 'config.json'} has no num_attention_heads" in err and "Fix:" in err
    assert generate_main(["--model", str(broken), "--prompt-ids", "5 6"]) == 2
    assert "has no num_attention_heads" in _error(capsys)


class _Payload:
    def __reduce__(self):
        return (os.system, (f"touch {tempfile.gettempdir()}/megakv-poisoned-bin-ran",))


def test_a_poisoned_pytorch_model_bin_is_refused_unrun(hf_dir, tmp_path, capsys):
    marker = Path(tempfile.gettempdir()) / "megakv-poisoned-bin-ran"
    marker.unlink(missing_ok=True)
    poisoned = _copy_dir(hf_dir, tmp_path / "poisoned")
    (poisoned / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "x": _Payload()}, poisoned / "pytorch_model.bin")
    assert convert_main(["from-hf", str(poisoned), str(tmp_path / "out")]) == 2
    err = _error(capsys)
    assert f"refusing to load {poisoned / 'pytorch_model.bin'}" in err and "Fix:" in err
    assert not marker.exists()
    _truncate(poisoned / "pytorch_model.bin", 100)
    assert convert_main(["from-hf", str(poisoned), str(tmp_path / "out")]) == 2
    assert f"{poisoned / 'pytorch_model.bin'}: truncated or not a torch file" in _error(capsys)


def test_an_unreadable_weights_file_is_not_called_corrupt(model_dir, monkeypatch, capsys):
    def unreadable(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("megakv.model_dir.load_file", unreadable)
    assert generate_main(["--model", str(model_dir), "--prompt-ids", "5 6"]) == 2
    err = _error(capsys)
    assert "cannot be read (Input/output error)" in err and "corrupt" not in err


# --- 4. --device and --threads are checked before anything is loaded ---

def test_auto_device_resolves_to_what_this_machine_has(model_dir, split, capsys):
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"
    assert generate_main(["--model", str(model_dir), "--prompt", "the cat", "--device", "auto",
                          "--max-new-tokens", "3"]) == 0
    assert eval_main(["--model", str(model_dir), "--data", str(split), "--retain", "all", "--seq-len", "16",
                      "--device", "auto", "--no-progress"]) == 0
    capsys.readouterr()


@pytest.mark.parametrize("argv,message", [
    (["--device", MISSING_DEVICE], f"--device = '{MISSING_DEVICE}'"),
    (["--device", "gpu"], "--device = 'gpu': not a torch device"),
    (["--threads", "-1"], "--threads = -1: must be a positive number"),
    (["--threads", "0"], "--threads = 0: must be a positive number"),
])
def test_a_bad_device_or_thread_count_is_one_clear_error(model_dir, split, capsys, argv, message):
    data = ["--data", str(split), "--no-progress"]
    for main, extra in ((generate_main, ["--prompt", "the cat"]), (eval_main, data),
                        (plan_main, [*data, "--budget", "0.5"])):
        assert main(["--model", str(model_dir), *extra, *argv]) == 2
        err = _error(capsys)
        assert message in err and "Fix:" in err


# --- 5. every eos id of a transformers config survives import and export and stops generation ---

@pytest.fixture(scope="module")
def eos_list_dirs(tmp_path_factory):
    """A transformers model whose config lists eos [2, 88] (as Llama-3-Instruct lists several), imported."""
    root = tmp_path_factory.mktemp("eos")
    hf = tiny_hf_model("llama", 2, False, eos_token_id=[2, 88])
    hf.generation_config.eos_token_id = [2, 88]
    hf.save_pretrained(root / "src")
    assert convert_main(["from-hf", str(root / "src"), str(root / "mk")]) == 0
    return hf, root


def test_from_hf_keeps_every_eos_id_and_the_exports_write_them_back(eos_list_dirs):
    _, root = eos_list_dirs
    model, _ = resolve_model(root / "mk")
    assert model.cfg.eos_token_id == [2, 88] and model.cfg.eos_token_ids == (2, 88)
    for command in ("to-hf", "to-hf-rcla"):
        out = root / command
        assert convert_main([command, str(root / "mk"), str(out)]) == 0
        for name in ("config.json", "generation_config.json"):
            assert json.loads((out / name).read_text())["eos_token_id"] == [2, 88], (command, name)


def test_generation_stops_at_any_eos_id_like_transformers(eos_list_dirs, capsys):
    hf, root = eos_list_dirs
    prompt = [5, 6, 7]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=0)
    expected = expected[0, len(prompt):].tolist()
    assert expected[-1] == 88 and len(expected) < 30  # the tiny model's greedy path ends on the second id
    assert generate_main(["--model", str(root / "mk"), "--prompt-ids", "5 6 7", "--max-new-tokens", "30"]) == 0
    assert capsys.readouterr().out.split() == [str(i) for i in expected]
    model, _ = resolve_model(root / "mk")
    out = InferenceEngine(model).generate([prompt], 30, eos_id=model.cfg.eos_token_ids)
    assert out.tokens == [expected] and out.finish_reasons == ["eos"]


def test_stop_ids_listed_only_in_generation_config_stop_generation_too(tmp_path, capsys):
    """Instruct models (Qwen2.5-Instruct) list their end-of-turn id in generation_config.json only: transformers'
    generate() stops there, megakv read config.json alone and ran on (6 tokens vs 16 in the audit)."""
    hf = tiny_hf_model("llama", 2, False, eos_token_id=2)
    hf.generation_config.eos_token_id = [2, 88]
    hf.save_pretrained(tmp_path / "src")
    assert json.loads((tmp_path / "src" / "config.json").read_text())["eos_token_id"] == 2
    prompt = [5, 6, 7]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=0)
    expected = expected[0, len(prompt):].tolist()
    assert expected[-1] == 88 and len(expected) < 30
    for model in (tmp_path / "src", tmp_path / "mk"):  # the transformers directory itself, and its import
        if model.name == "mk":
            assert convert_main(["from-hf", str(tmp_path / "src"), str(model)]) == 0
            capsys.readouterr()
        assert generate_main(["--model", str(model), "--prompt-ids", "5 6 7", "--max-new-tokens", "30"]) == 0
        assert capsys.readouterr().out.split() == [str(i) for i in expected], model.name
    assert resolve_model(tmp_path / "mk")[0].cfg.eos_token_ids == (2, 88)
    assert convert_main(["to-hf-rcla", str(tmp_path / "mk"), str(tmp_path / "rcla")]) == 0
    assert json.loads((tmp_path / "rcla" / "generation_config.json").read_text())["eos_token_id"] == [2, 88]


def test_an_eos_list_outside_the_vocabulary_is_refused():
    with pytest.raises(ConfigError, match=r"model.eos_token_id.*outside the vocabulary"):
        tiny_config(eos_token_id=[EOS_ID, 10_000]).validate()
    with pytest.raises(ConfigError, match=r"model.eos_token_id.*empty list"):
        tiny_config(eos_token_id=[]).validate()


# --- 6. megakv-eval --task qa refuses the loss-report options ---

# --batch-size 8 and --cache-dtype bfloat16 are their defaults: given, they are still refused (the user meant them)
@pytest.mark.parametrize("option,value", [("--baseline", None), ("--plot", "qa.png"), ("--max-tokens", "100"),
                                          ("--batch-size", "8"), ("--text-key", "body"),
                                          ("--cache-dtype", "bfloat16")])
def test_qa_task_refuses_loss_only_options(model_dir, tmp_path, capsys, option, value):
    qa = tmp_path / "qa.jsonl"
    qa.write_text(json.dumps({"context": "the cat sat on a mat", "question": "what sat", "answer": "the cat"}) + "\n")
    value = str(model_dir) if option == "--baseline" else value
    assert eval_main(["--task", "qa", "--model", str(model_dir), "--data", str(qa), "--no-progress",
                      option, value, "--json", str(tmp_path / "qa.json")]) == 2
    err = _error(capsys)
    assert f"{option} applies to --task lm" in err and "Fix:" in err
    assert not (tmp_path / "qa.png").exists() and not (tmp_path / "qa.json").exists()


@pytest.mark.parametrize("option", [["--limit", "5"], ["--spread"], ["--order", "qca"], ["--max-new-tokens", "4"]])
def test_loss_task_refuses_qa_only_options(model_dir, tmp_path, capsys, option):
    text = tmp_path / "held_out.txt"
    text.write_text("the cat sat on a mat\n" * 20)
    assert eval_main(["--model", str(model_dir), "--data", str(text), "--no-progress", *option,
                      "--json", str(tmp_path / "lm.json")]) == 2
    err = _error(capsys)
    assert f"{option[0]} applies to --task qa only" in err and "Fix:" in err
    assert not (tmp_path / "lm.json").exists()
    assert eval_main(["--model", str(model_dir), "--data", str(text), "--no-progress", "--retain", "every:1"]) == 0


# --- bad inputs found by the CLI audit of 2026-12-07 (each was a traceback or a meaningless exit 0) ---


@pytest.mark.parametrize("temperature", ["nan", "inf", "-1"])
def test_a_temperature_that_means_nothing_is_refused(model_dir, capsys, temperature):
    argv = ["--model", str(model_dir), "--prompt-ids", "5 6", "--max-new-tokens", "2", "--temperature", temperature]
    assert generate_main(argv) == 2  # nan: a traceback from torch.multinomial; inf: uniform tokens, exit 0
    assert "temperature must be finite and >= 0" in _error(capsys)


def test_a_tiny_temperature_samples_the_most_likely_token(model_dir, capsys):
    from megakv.inference.sampling import SamplingConfig, sample_next_token

    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    for temperature in (1e-45, 1e-300):  # logits / temperature overflowed to inf - inf = NaN
        assert sample_next_token(logits, SamplingConfig(temperature=temperature, seed=0)).tolist() == [1, 0]
    argv = ["--model", str(model_dir), "--prompt-ids", "5 6", "--max-new-tokens", "3", "--no-eos-stop"]
    assert generate_main([*argv, "--temperature", "1e-300", "--seed", "1"]) == 0
    sampled = capsys.readouterr().out
    assert generate_main(argv) == 0 and capsys.readouterr().out == sampled  # = greedy


def test_a_config_json_that_is_not_an_object_is_named(model_dir, tmp_path, capsys):
    broken = tmp_path / "hf"
    broken.mkdir()
    (broken / "config.json").write_text("[1, 2]")
    assert generate_main(["--model", str(broken), "--prompt-ids", "5 6"]) == 2
    assert "holds a JSON list, not an object" in _error(capsys)


def test_running_out_of_memory_is_a_clear_error_and_a_bug_keeps_its_traceback(capsys):
    """--max-new-tokens 100000000 asked torch for a 25 GB KV cache: a traceback. The handler is tested with the
    error torch raises (allocating that much here would take the machine's memory)."""
    from megakv.inference.cli_support import run_cli

    def out_of_memory() -> int:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:119] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 25600000512 bytes")

    assert run_cli("megakv-generate", out_of_memory) == 2
    assert "out of memory" in _error(capsys)

    def bug() -> int:
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_cli("megakv-generate", bug)


def test_a_tokenizer_pad_id_outside_the_vocabulary_pads_with_another_id(tmp_path, capsys):
    """A tokenizer with an added [PAD] beyond the model's embedding rows: a batch of prompts of different
    lengths was an IndexError traceback (exit 1); padded positions are masked, so any id inside will do. The
    engine itself names a pad_id outside the vocabulary."""
    from test_inference_support import write_tokenizer
    from tokenizers import Tokenizer

    tokenizer_dir = write_tokenizer(tmp_path / "tok-src")
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.add_special_tokens(["[PAD]"])
    tokenizer.save(str(tokenizer_dir / "tokenizer.json"))
    settings = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({**settings, "pad_token": "[PAD]"}))
    model = tiny_model(seed=1, pad_token_id=None)
    assert tokenizer.token_to_id("[PAD]") == model.cfg.vocab_size  # one past the embedding rows
    model_dir = save_model_dir(model.cfg, model.state_dict(), tmp_path / "model", tokenizer_dir=tokenizer_dir)
    argv = ["--model", str(model_dir), "--prompt", "the cat sat", "--prompt", "dog", "--max-new-tokens", "3"]
    assert generate_main(argv) == 0, _error(capsys)
    with pytest.raises(ValueError, match="pad_id .* outside the model's vocabulary"):
        InferenceEngine(model).generate([[5, 6], [7]], 2, pad_id=model.cfg.vocab_size)


def test_max_new_tokens_below_one_is_named_by_its_flag(model_dir, capsys):
    assert generate_main(["--model", str(model_dir), "--prompt-ids", "5 6", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be >= 1" in _error(capsys)


@pytest.mark.parametrize("option", [["--top-k", "3"], ["--top-p", "0.5"], ["--seed", "1"]])
def test_sampling_options_without_a_temperature_are_refused(model_dir, capsys, option):
    """--top-k 3 --seed 1 and --top-k 3 --seed 2 both printed the greedy tokens: sampling needs a temperature."""
    argv = ["--model", str(model_dir), "--prompt-ids", "5 6", "--max-new-tokens", "2", *option]
    assert generate_main(argv) == 2
    assert f"{option[0]} applies to sampling" in _error(capsys)
    assert generate_main([*argv, "--temperature", "0.8"]) == 0


def test_add_bos_applies_to_token_id_prompts_too(tmp_path, capsys):
    """--add-bos did nothing with --prompt-ids (exit 0); --no-bos cannot apply to them and is refused."""
    model_dir = write_model_dir(tmp_path, tiny_model(seed=6, bos_token_id=1))
    argv = ["--model", str(model_dir), "--max-new-tokens", "4", "--no-eos-stop"]
    assert generate_main([*argv, "--prompt-ids", "1 5 6 7"]) == 0
    with_bos = capsys.readouterr().out
    assert generate_main([*argv, "--prompt-ids", "5 6 7"]) == 0
    assert capsys.readouterr().out != with_bos
    assert generate_main([*argv, "--prompt-ids", "5 6 7", "--add-bos"]) == 0
    assert capsys.readouterr().out == with_bos
    assert generate_main([*argv, "--prompt-ids", "1 5 6 7", "--add-bos"]) == 0  # never doubled
    assert capsys.readouterr().out == with_bos
    assert generate_main([*argv, "--prompt-ids", "5 6 7", "--no-bos"]) == 2
    assert "--no-bos applies to text prompts" in _error(capsys)


def test_decode_speed_counts_the_tokens_rows_still_generating_get(eos_list_dirs):
    """A row that stopped at eos rides along in the batch; its steps were counted as generated tokens, so
    decode tokens/s overstated what a batch with early stops delivered (2 x 29 counted for 2 + 29 given)."""
    _, root = eos_list_dirs
    model, _ = resolve_model(root / "mk")
    out = InferenceEngine(model).generate([[5, 6, 7], [9, 10, 11, 12]], 30, eos_id=model.cfg.eos_token_ids)
    lengths = [len(t) for t in out.tokens]
    assert out.finish_reasons == ["eos", "length"] and lengths[0] < lengths[1] == out.stats.new_tokens == 30
    assert out.stats.decode_tokens == sum(n - 1 for n in lengths) < 2 * (out.stats.new_tokens - 1)
    assert out.stats.decode_tokens_per_s == pytest.approx(out.stats.decode_tokens / out.stats.decode_s)
