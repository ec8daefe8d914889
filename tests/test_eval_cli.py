"""megakv-generate, megakv-eval and megakv-plan end to end on a tiny model directory with a tokenizer."""

from __future__ import annotations

import json

import pytest
from test_inference_support import random_text, tiny_model, write_indexed_split, write_model_dir

from megakv.cli.eval import main as eval_main
from megakv.cli.generate import main as generate_main
from megakv.cli.plan import main as plan_main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("cli"), tiny_model(seed=6))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_indexed_split(tmp_path_factory.mktemp("data") / "val", n_docs=8, doc_len=30)


def test_generate_text_with_stats(model_dir, capsys):
    assert generate_main(["--model", str(model_dir), "--prompt", "the cat sat", "--prompt", "hello",
                          "--retain", "every:2", "--max-new-tokens", "5", "--stats"]) == 0
    out = capsys.readouterr().out
    assert "--- [0]" in out and "--- [1]" in out
    assert "the cat sat" in out
    assert "# retained layers: [0, 2, 4] (3/6 = 50.0%)" in out
    assert "# KV cache: 768 bytes/token/sequence" in out
    assert "time to first token" in out and "tokens/s" in out


def test_generate_warns_past_the_context_by_the_positions_it_runs(model_dir, capsys):
    """A prompt of 3 and 62 new tokens runs positions 0..63 (the last token is returned, never run), which fit the
    model's 64; one more token does not. The cache holds exactly those positions (it held one more)."""
    base = ["--model", str(model_dir), "--prompt-ids", "5 9 14", "--no-eos-stop", "--stats"]
    assert generate_main([*base, "--max-new-tokens", "62"]) == 0
    fits = capsys.readouterr()
    assert "trained context" not in fits.err and "x 64 positions" in fits.out
    assert generate_main([*base, "--max-new-tokens", "63"]) == 0
    past = capsys.readouterr()
    assert "65 positions exceed the model's trained context (64)" in past.err and "x 65 positions" in past.out


def test_generate_sampling_is_reproducible(model_dir, capsys):
    argv = ["--model", str(model_dir), "--prompt", "a fox", "--retain", "0,3", "--temperature", "0.9",
            "--top-k", "8", "--top-p", "0.95", "--seed", "3", "--max-new-tokens", "6"]
    assert generate_main(argv) == 0
    first = capsys.readouterr().out
    assert generate_main(argv) == 0
    assert capsys.readouterr().out == first
    # --stats times a warm engine (an untimed first generation pays the one-time set-up): the same sample
    assert generate_main([*argv, "--stats"]) == 0
    stats = capsys.readouterr().out
    assert stats.startswith(first) and "warm engine" in stats


@pytest.mark.parametrize("argv,message", [
    (["--retain", "1,2"], "must include layer 0"),
    (["--retain", "0,7"], "out of range"),
    (["--temperature", "-1"], "temperature must be finite and >= 0"),
])
def test_generate_bad_input(model_dir, capsys, argv, message):
    assert generate_main(["--model", str(model_dir), "--prompt", "the"] + argv) == 2
    assert message in capsys.readouterr().err


def test_eval_cli_on_indexed_split(model_dir, split, tmp_path, capsys):
    assert eval_main(["--model", str(model_dir), "--data", str(split), "--retain", "every:1", "every:2", "every:4",
                      "--seq-len", "16", "--json", str(tmp_path / "e.json"), "--plot", str(tmp_path / "e.png")]) == 0
    out = capsys.readouterr().out
    assert "every:4" in out and "ppl" in out
    data = json.loads((tmp_path / "e.json").read_text())
    assert [r["retained"] for r in data["results"]] == [[0, 1, 2, 3, 4, 5], [0, 2, 4], [0, 4]]
    assert data["seq_len"] == 16
    assert (tmp_path / "e.png").stat().st_size > 1000


def test_eval_cli_on_text_file(model_dir, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text(random_text(300))
    assert eval_main(["--model", str(model_dir), "--data", str(text), "--retain", "all", "0,3"]) == 0
    assert "0,3" in capsys.readouterr().out


def test_eval_cli_bad_input(model_dir, split, tmp_path, capsys):
    assert eval_main(["--model", str(model_dir), "--data", str(tmp_path / "none"), "--retain", "all"]) == 2
    assert "not found" in capsys.readouterr().err
    assert eval_main(["--model", str(model_dir), "--data", str(split), "--retain", "all", "3,4"]) == 2
    assert "must include layer 0" in capsys.readouterr().err


def test_plan_cli(model_dir, split, tmp_path, capsys):
    assert plan_main(["--model", str(model_dir), "--data", str(split), "--budget", "50%", "--seq-len", "16",
                      "--max-evaluations", "30", "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "best: --retain 0" in out
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["max_layers"] == 3 and data["best"]["layers"] <= 3
    assert data["best"]["loss"] <= min(c["loss"] for c in data["every_k"]) + 1e-12


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_byte_budget_is_counted_in_the_dtype_the_engine_stores_the_cache_in(model_dir, split, tmp_path, dtype):
    """--cache-dtype defaulted to bfloat16 while the model ran in float32 (--dtype's default), so the plan chosen
    for a byte budget allocated twice the budget (audit: 384 B/token planned, 768 allocated). By default the
    bytes are now those of the cache megakv's engine allocates at --dtype, in megakv-plan as in megakv-eval."""
    from megakv.inference.cli_support import DTYPES
    from megakv.inference.engine import InferenceEngine
    from megakv.model_paths import resolve_model

    model, _ = resolve_model(str(model_dir), "cpu", DTYPES[dtype])
    full = InferenceEngine(model, retain="all").new_cache(1, 8).bytes_per_token
    budget = full // 2  # half the full cache, as the engine counts it
    assert plan_main(["--model", str(model_dir), "--data", str(split), "--budget", f"{budget}B", "--dtype", dtype,
                      "--seq-len", "16", "--max-evaluations", "10", "--json", str(tmp_path / "p.json")]) == 0
    best = json.loads((tmp_path / "p.json").read_text())["best"]
    allocated = InferenceEngine(model, retain=best["retain"]).new_cache(1, 8).bytes_per_token
    assert best["kv_bytes_per_token"] == allocated <= budget
    assert eval_main(["--model", str(model_dir), "--data", str(split), "--retain", best["retain"], "--dtype", dtype,
                      "--seq-len", "16", "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["results"][0]["kv_bytes_per_token"] == allocated


@pytest.mark.parametrize("budget,message", [("0.1", "below one layer"), ("10B", "below one layer's cache"),
                                            ("much", "bad budget")])
def test_plan_cli_bad_budget(model_dir, split, capsys, budget, message):
    assert plan_main(["--model", str(model_dir), "--data", str(split), "--budget", budget]) == 2
    assert message in capsys.readouterr().err


def test_generate_and_export_with_the_data_packages_sentencepiece_tokenizer(tmp_path, capsys):
    from megakv.data.tokenizer import load_tokenizer, train_sentencepiece
    from megakv.hf.modeling import export_for_transformers
    from megakv.model_dir import save_model_dir
    from megakv.model_paths import resolve_model

    info = train_sentencepiece([random_text(3000)], tmp_path / "spm", vocab_size=300)
    model = tiny_model(seed=7, vocab_size=info.vocab_size, eos_token_id=info.eos_id, bos_token_id=info.bos_id,
                       pad_token_id=info.pad_id)
    model_dir = save_model_dir(model.cfg, model.state_dict(), tmp_path / "model", tokenizer_dir=tmp_path / "spm")
    assert generate_main(["--model", str(model_dir), "--prompt", "the king says", "--max-new-tokens", "4",
                          "--retain", "every:3", "--no-eos-stop"]) == 0
    assert capsys.readouterr().out.startswith("the king says")
    out = export_for_transformers(model_dir, tmp_path / "hf", retain="every:2")
    _, tokenizer_dir = resolve_model(out)
    assert load_tokenizer(tokenizer_dir).encode("the cat") == load_tokenizer(tmp_path / "spm").encode("the cat")


def test_eval_cli_baseline_side_by_side_equals_two_separate_runs(model_dir, split, tmp_path, capsys):
    other = write_model_dir(tmp_path / "other", tiny_model(seed=11))
    retain = ["every:1", "every:2", "every:3"]
    for path, name in ((model_dir, "a.json"), (other, "b.json")):
        assert eval_main(["--model", str(path), "--data", str(split), "--retain", *retain, "--seq-len", "16",
                          "--json", str(tmp_path / name), "--no-progress"]) == 0
    alone = [[r["loss"] for r in json.loads((tmp_path / n).read_text())["results"]] for n in ("a.json", "b.json")]
    capsys.readouterr()
    assert eval_main(["--model", str(model_dir), "--baseline", str(other), "--data", str(split), "--retain", *retain,
                      "--seq-len", "16", "--json", str(tmp_path / "both.json"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    both = json.loads((tmp_path / "both.json").read_text())
    assert [r["loss"] for r in both["results"]] == alone[0]
    assert [r["loss"] for r in both["baseline_results"]] == alone[1]
    row = next(line for line in out.splitlines() if line.startswith("every:2") and line.count(".") >= 4)
    ratio_a, ratio_b = float(row.split()[-3]), float(row.split()[-1])
    assert ratio_a == pytest.approx(alone[0][1] / alone[0][0], abs=1e-3)
    assert ratio_b == pytest.approx(alone[1][1] / alone[1][0], abs=1e-3)


def test_eval_cli_baseline_of_another_shape_is_refused(model_dir, split, tmp_path, capsys):
    deeper = write_model_dir(tmp_path / "deeper", tiny_model(seed=1, n_layers=8))
    assert eval_main(["--model", str(model_dir), "--baseline", str(deeper), "--data", str(split),
                      "--retain", "all"]) == 2
    assert "n_layers=8" in capsys.readouterr().err


def test_eval_refuses_data_prepared_with_another_tokenizer(tmp_path, capsys):
    """megakv-eval scored a prefix made with another tokenizer and exited 0 with a meaningless loss (the ids
    fitted the vocabulary); megakv-train refused the same pairing. Data made with the model's tokenizer, or
    with the transformers files of it, is scored."""
    import shutil

    from train_data import prepare_tiny_dataset

    from megakv.hf.tokenizer import write_hf_tokenizer
    from megakv.model_dir import save_model_dir

    prefix = prepare_tiny_dataset(tmp_path / "data", vocab_size=300)
    model = tiny_model(seed=2, vocab_size=320)
    foreign = write_model_dir(tmp_path / "foreign", model)  # the word-level test tokenizer
    args = ["--data", str(prefix), "--retain", "all", "--seq-len", "16", "--max-tokens", "256"]
    assert eval_main(["--model", str(foreign), *args]) == 2
    err = capsys.readouterr().err
    assert "was prepared with the tokenizer" in err and f"megakv-prep --tokenizer {foreign / 'tokenizer'}" in err
    own = save_model_dir(model.cfg, model.state_dict(), tmp_path / "own", tokenizer_dir=prefix.parent / "tokenizer")
    assert eval_main(["--model", str(own), *args]) == 0
    shutil.rmtree(own / "tokenizer")
    write_hf_tokenizer(prefix.parent / "tokenizer", own / "tokenizer")  # the same ids from other files
    assert eval_main(["--model", str(own), *args]) == 0
    # Raw text with a --tokenizer other than the model's was encoded with it and scored, exit 0.
    text = tmp_path / "held_out.txt"
    text.write_text(random_text(300))
    raw = ["--data", str(text), "--retain", "all", "--seq-len", "16"]
    assert eval_main(["--model", str(foreign), *raw, "--tokenizer", str(prefix.parent / "tokenizer")]) == 2
    assert "gives other token ids than the model's tokenizer" in capsys.readouterr().err
    assert eval_main(["--model", str(own), *raw, "--tokenizer", str(prefix.parent / "tokenizer")]) == 0


def test_results_paths_are_checked_before_the_evaluation(model_dir, split, tmp_path, capsys):
    """--json naming a directory failed with a traceback after the whole evaluation; --plot p.txt failed after it
    too, and --plot without a suffix said 'wrote p' where matplotlib wrote p.png."""
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("x")
    base = ["--model", str(model_dir), "--data", str(split), "--retain", "all", "--seq-len", "16", "--no-progress"]
    for extra, words in ((["--json", str(tmp_path / "a_dir")], "is a directory"),
                         (["--json", str(tmp_path / "a_file" / "e.json")], "is a file, so nothing can be written"),
                         (["--plot", str(tmp_path / "p.txt")], "ending in .avif, .eps"),
                         (["--plot", str(tmp_path / "p")], "ending in .avif, .eps")):
        assert eval_main([*base, *extra]) == 2, extra
        captured = capsys.readouterr()
        assert words in captured.err and "every:1" not in captured.out, extra  # refused before scoring
    assert plan_main(["--model", str(model_dir), "--data", str(split), "--budget", "50%", "--seq-len", "16",
                      "--json", str(tmp_path / "a_dir")]) == 2
    assert "is a directory" in capsys.readouterr().err


def test_eval_refuses_a_window_or_batch_of_nothing(model_dir, split, capsys):
    """--seq-len 0 meant the model's context; --batch-size 0 was accepted."""
    base = ["--model", str(model_dir), "--data", str(split), "--retain", "all"]
    assert eval_main([*base, "--seq-len", "0"]) == 2
    assert "--seq-len must be >= 1" in capsys.readouterr().err
    assert eval_main([*base, "--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1" in capsys.readouterr().err


def test_generate_starts_a_prompt_with_the_bos_the_tokenizer_adds_unless_told_not_to(tmp_path, capsys):
    """A Llama-style tokenizer starts every text with <s>: a text prompt gets it (as transformers' tokenizer(text)
    does; --add-bos no longer doubles it); --no-bos serves a model trained on data prepared without it."""
    from data_fixtures import synthetic_documents
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from megakv.data.tokenizer import import_hf_tokenizer
    from megakv.model_dir import save_model_dir

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(synthetic_documents(80), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>") \
        .save_pretrained(str(tmp_path / "hf_tok"))
    import_hf_tokenizer(tmp_path / "hf_tok", tmp_path / "tok")
    model = tiny_model(seed=3, vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model_dir = save_model_dir(model.cfg, model.state_dict(), tmp_path / "model", tokenizer_dir=tmp_path / "tok")

    def continuation(prompt: str, *argv: str) -> str:  # what follows the echoed prompt
        assert generate_main(["--model", str(model_dir), "--prompt", prompt, "--max-new-tokens", "8", "--no-eos-stop",
                              *argv]) == 0
        out = capsys.readouterr().out
        assert out.startswith(prompt)
        return out[len(prompt):]

    text = "the quick brown fox"
    with_bos = continuation(text)
    assert continuation(text, "--add-bos") == with_bos == continuation("<s>" + text)
    assert continuation(text, "--no-bos") != with_bos
    assert generate_main(["--model", str(model_dir), "--prompt", text, "--add-bos", "--no-bos"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_float16_overflow_is_an_error_not_a_nan_loss_or_token_0(tmp_path, split, capsys):
    """Activations beyond float16's 65504 printed 'loss nan', greedy generation printed token 0 (exit 0 both),
    sampling a torch traceback; a weight beyond it became inf in a float16 export. Each is an error now."""
    import torch

    from megakv.cli.convert import main as convert_main

    model = tiny_model(seed=6)
    with torch.no_grad():
        model.norm.weight.fill_(3e4)  # the final norm's output, and so the logits, beyond float16
    loud = write_model_dir(tmp_path / "loud", model)
    assert eval_main(["--model", str(loud), "--data", str(split), "--seq-len", "16"]) == 0  # float32: fine
    capsys.readouterr()
    assert eval_main(["--model", str(loud), "--data", str(split), "--seq-len", "16", "--dtype", "float16"]) == 2
    assert "loss is not finite in float16" in capsys.readouterr().err
    for sampling in ([], ["--temperature", "0.8", "--seed", "1"]):
        assert generate_main(["--model", str(loud), "--prompt", "the", "--max-new-tokens", "3", "--dtype",
                              "float16", *sampling]) == 2
        err = capsys.readouterr().err
        assert "logits are not finite (NaN or inf) in float16" in err and "--dtype bfloat16 or float32" in err

    with torch.no_grad():
        model.norm.weight.fill_(1e5)  # a weight float16 cannot hold
    huge = write_model_dir(tmp_path / "huge", model)
    for command in ("to-hf", "to-hf-rcla"):
        assert convert_main([command, str(huge), str(tmp_path / command), "--dtype", "float16"]) == 2
        assert "norm.weight holds 1e+05, beyond float16's largest value 65504" in capsys.readouterr().err
        assert not (tmp_path / command).exists()


def test_exports_record_and_keep_the_weights_dtype(tmp_path, capsys):
    """to-hf-rcla without --dtype wrote a bf16 model as float32 (twice the size; its help says 'keep'), and
    to-hf wrote "dtype": null into config.json."""
    import torch
    from safetensors import safe_open

    from megakv.cli.convert import main as convert_main

    bf16 = write_model_dir(tmp_path / "bf16", tiny_model(seed=6).to(torch.bfloat16))
    for command in ("to-hf", "to-hf-rcla"):
        assert convert_main([command, str(bf16), str(tmp_path / command)]) == 0
        assert json.loads((tmp_path / command / "config.json").read_text())["dtype"] == "bfloat16"
        with safe_open(str(next((tmp_path / command).glob("*.safetensors"))), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    capsys.readouterr()


def test_eval_refuses_qa_records_whose_loss_mask_it_would_ignore(model_dir, split, tmp_path, capsys):
    """On a megakv-qa prep output the loss counted prompts and padding (4.22 where training's masked
    validation said 2.27, audit), with no word: refused, naming --task qa."""
    import shutil

    import numpy as np

    from megakv.data.indexed import IndexedDataset, IndexedWriter, mask_prefix

    records = tmp_path / "qa"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{split}{suffix}", f"{records}{suffix}")
    with IndexedWriter(mask_prefix(records), np.uint8) as masks:
        tokens = IndexedDataset(records)
        for i in range(len(tokens)):
            masks.add_document(np.ones(len(tokens.get(i)), np.uint8))
        masks.finalize()
    assert eval_main(["--model", str(model_dir), "--data", str(records), "--seq-len", "16"]) == 2
    err = capsys.readouterr().err
    assert "holds QA records with a loss mask" in err and "--task qa" in err
    assert eval_main(["--model", str(model_dir), "--data", str(split), "--seq-len", "16"]) == 0  # plain: fine
