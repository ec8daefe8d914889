"""Fine-tuning an existing transformers model with R-CLA: from-hf, then megakv-train checkpoint.init_from=DIR."""

from __future__ import annotations

from dataclasses import asdict

import pytest
import torch
import transformers
from train_data import prepare_tiny_dataset
from train_helpers import launch_train, step_losses

from megakv.cli.convert import main as convert_main
from megakv.model_dir import load_model, load_model_config
from megakv.train.export import consolidated_state_dict

pytestmark = [pytest.mark.distributed]

LR = 1e-3


def model_overrides(model_dir) -> list[str]:
    cfg = asdict(load_model_config(model_dir))
    cfg.pop("rope_scaling")  # default in both
    return [f"model.{k}={'null' if v is None else v}" for k, v in cfg.items()]


def test_finetune_starts_from_the_imported_weights(tmp_path):
    dataset = prepare_tiny_dataset(tmp_path / "data")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    assert convert_main(["from-hf", str(tmp_path / "hf"), str(tmp_path / "llama")]) == 0

    run_dir = tmp_path / "run"
    run = launch_train([f"data.datasets=[{dataset}]", f"train.run_dir={run_dir}", "train.steps=1",
                        f"checkpoint.init_from={tmp_path / 'llama'}", f"optim.lr={LR}", "optim.warmup_steps=0",
                        "optim.weight_decay=0.0", "routing.q_cross=0.5", *model_overrides(tmp_path / "llama")],
                       nproc=1)
    assert run.ok, run.output[-4000:]
    assert 1 in step_losses(run_dir)
    _, trained, _ = consolidated_state_dict(run_dir)
    start = load_model(tmp_path / "llama").state_dict()
    # One Adam step moves every weight by at most about lr: the run started from the imported weights
    # (a fresh random init would differ by orders of magnitude more).
    drift = max((trained[k] - start[k]).abs().max().item() for k in start)
    assert 0 < drift <= 1.05 * LR, drift

    # A model directory whose settings differ from the config's model section is refused, naming the field.
    other = launch_train([f"data.datasets=[{dataset}]", f"train.run_dir={tmp_path / 'run2'}", "train.steps=1",
                          f"checkpoint.init_from={tmp_path / 'llama'}", "optim.warmup_steps=0",
                          *model_overrides(tmp_path / "llama"),
                          "model.ffn_hidden=96"], nproc=1)
    assert other.returncodes == [2] and "checkpoint.init_from" in other.output and "model.ffn_hidden" in other.output
