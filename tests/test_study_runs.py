"""megakv/study/runs.py: a cached run is reused only with the settings it was trained with, and a cached
score only for the model it scored."""

from __future__ import annotations

import os

from megakv.config import load_config
from megakv.study.runs import model_fingerprint, settings_changes


def _saved_run(run_dir, text: str):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(text)
    return run_dir


SAVED = """routing:
  strategy: rcla
  max_distance: null
  per_micro_batch: true
optim:
  lr: 0.0003
data:
  datasets:
  - data/train_256
"""


def test_no_run_yet_means_no_changes(tmp_path):
    assert settings_changes(tmp_path / "absent", ["optim.lr=1"]) == []


def test_same_settings_in_another_spelling_are_not_changes(tmp_path, monkeypatch):
    run = _saved_run(tmp_path / "run", SAVED)
    monkeypatch.chdir(tmp_path)
    asked = ["routing.strategy=rcla", "routing.max_distance=null", "routing.per_micro_batch=true",
             "optim.lr=3e-4", f"data.datasets=[{tmp_path}/data/train_256]"]  # absolute path, same file
    assert settings_changes(run, asked) == []


def test_each_changed_setting_is_named_with_both_values(tmp_path):
    run = _saved_run(tmp_path / "run", SAVED)
    asked = ["routing.max_distance=1", "optim.lr=3e-4", "data.datasets=[data/train_512]", "train.steps=48"]
    assert settings_changes(run, asked) == ["routing.max_distance: None -> 1",
                                            "data.datasets: ['data/train_256'] -> ['data/train_512']",
                                            "train.steps: None -> 48"]


def test_fingerprint_follows_the_saved_model(tmp_path):
    model = _saved_run(tmp_path / "model", SAVED)
    (model / "model.safetensors").write_bytes(b"x" * 8)
    first = model_fingerprint(model)
    assert model_fingerprint(model) == first
    (model / "model.safetensors").write_bytes(b"y" * 9)  # written again
    assert model_fingerprint(model) != first
    second = model_fingerprint(model)
    os.utime(model / "model.safetensors", ns=(1, 1))
    assert model_fingerprint(model) != second
    (model / "status.json").write_text('{"state": "finished", "step": 4}')
    assert model_fingerprint(model) != model_fingerprint(tmp_path / "model-copy-missing")


def test_a_key_given_twice_is_judged_by_its_last_value(tmp_path):
    """megakv-train applies overrides in order (the last one wins), so only the last value can differ."""
    assert load_config(None, ["optim.lr=1e-3", "optim.lr=3e-4"]).optim.lr == 3e-4
    run = _saved_run(tmp_path / "run", SAVED)
    assert settings_changes(run, ["optim.lr=1e-3", "optim.lr=3e-4"]) == []
    assert settings_changes(run, ["optim.lr=3e-4", "optim.lr=1e-3"]) == ["optim.lr: 0.0003 -> 0.001"]


def test_a_setting_that_comes_from_the_recipe_is_compared_too(tmp_path):
    """The study passes a recipe plus overrides: a value the recipe supplies (weight decay, seeds, the q_cross
    ramp left at its default) must match the saved run as well, or the cached model is not reused."""
    from megakv.config import save_config

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  weight_decay: 0.1\nrouting:\n  seed: 1234\n  q_cross_warmup_steps: 8\n"
                      "logging:\n  log_every: 5\n")
    asked = ["optim.lr=3e-4", "data.datasets=[data/train_256]"]
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(recipe, asked), run / "config.yaml")  # what megakv-train saved for that run
    assert settings_changes(run, asked, recipe) == []
    recipe.write_text("optim:\n  weight_decay: 0.0\nrouting:\n  seed: 1234\nlogging:\n  log_every: 50\n")
    assert sorted(settings_changes(run, asked, recipe)) == ["optim.weight_decay: 0.1 -> 0.0",
                                                            "routing.q_cross_warmup_steps: 8 -> 0"]  # not logging


def test_a_run_retrained_in_place_with_the_same_settings_has_another_fingerprint(tmp_path):
    """Same config.yaml, status.json and `latest` tag: only the checkpoint's manifest (run id, file digests)
    tells the models apart, so a cached QA score of the old one is not reused for the new one."""
    run = _saved_run(tmp_path / "run", SAVED)
    (run / "status.json").write_text('{"state": "finished", "step": 4}')
    tag = run / "checkpoints" / "step_00000004"
    tag.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000004")
    (tag / "megakv_state.json").write_text('{"run_id": "first", "files": {"a.pt": [8, "aaaa"]}}')
    first = model_fingerprint(run)
    (tag / "megakv_state.json").write_text('{"run_id": "second", "files": {"a.pt": [8, "bbbb"]}}')
    assert model_fingerprint(run) != first


def _reprepare(prefix, docs: list[str]) -> None:
    """Prepare `docs` again under `prefix` (its tokenizer kept), as a user re-running megakv-prep would."""
    import json

    from megakv.data.preprocess import preprocess

    corpus = prefix.parent.parent / "other.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    preprocess([str(corpus)], prefix.parent / "tokenizer", prefix, overwrite=True, progress=False)


def test_a_cached_run_is_not_reused_on_data_prepared_again_under_the_same_name(tmp_path, monkeypatch):
    """The study compared settings only: data prepared again under the same prefix (or a rebuilt base model)
    reused the models and scores of the old one, with every setting unchanged (audit: 'cached', the same
    losses). Each run's inputs are recorded by content and checked on reuse."""
    import pytest

    from megakv.config import save_config
    from megakv.study.runs import train_run
    from megakv.testing.tiny_data import prepare_tiny_dataset, synthetic_text

    prefix = prepare_tiny_dataset(tmp_path / "d")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("optim:\n  lr: 0.001\n")
    asked = [f"data.datasets=[{prefix}]"]
    run = tmp_path / "runs" / "q0"
    run.mkdir(parents=True)
    save_config(load_config(recipe, asked), run / "config.yaml")
    (run / "status.json").write_text('{"state": "finished", "step": 4}')
    logged = []
    assert train_run(recipe, run, asked, log=logged.append) == 0.0  # cached: the record starts here
    assert train_run(recipe, run, asked, log=logged.append) == 0.0  # the same data: cached again
    assert logged == [f"cached: {run}"] * 2
    monkeypatch.chdir(tmp_path)  # the same files named relative to the working directory (--out study vs $PWD/study)
    relative = [f"data.datasets=[{prefix.relative_to(tmp_path)}]"]
    save_config(load_config(recipe, relative), run / "config.yaml")
    assert train_run(recipe, run, relative, log=logged.append) == 0.0
    _reprepare(prefix, synthetic_text()[::-1][:40])
    with pytest.raises(ValueError, match=rf"trained on other inputs than these \(data {prefix} changed"):
        train_run(recipe, run, asked, log=logged.append)


def test_a_cached_retention_loss_is_not_reused_on_data_prepared_again(tmp_path):
    import torch

    from megakv.config import ModelConfig
    from megakv.model import MegaKVModel
    from megakv.model_dir import save_model_dir
    from megakv.study.runs import retention_losses
    from megakv.testing.tiny_data import prepare_tiny_dataset, synthetic_text

    prefix = prepare_tiny_dataset(tmp_path / "d")
    cfg = ModelConfig(vocab_size=320, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)
    torch.manual_seed(0)
    model = save_model_dir(cfg, MegaKVModel(cfg, init_seed=3).state_dict(), tmp_path / "model",
                           tokenizer_dir=prefix.parent / "tokenizer")
    first = retention_losses(model, prefix, ["every:1"], max_tokens=256, log=print)
    assert retention_losses(model, prefix, ["every:1"], max_tokens=256, log=print) == first
    # A cache written before keys held the data's content is taken over, not scored again.
    import json

    cache = model / "retention_losses.json"
    (key, losses), = json.loads(cache.read_text()).items()
    old_key = f"{prefix.resolve()}|256|None"
    cache.write_text(json.dumps({old_key: {"every:1": 1.25}}))
    scored = []
    assert retention_losses(model, prefix, ["every:1"], max_tokens=256, log=scored.append) == {"every:1": 1.25}
    assert scored == [] and json.loads(cache.read_text()) == {key: {"every:1": 1.25}}
    cache.write_text(json.dumps({key: losses}))
    _reprepare(prefix, synthetic_text()[::-1][:40])
    assert retention_losses(model, prefix, ["every:1"], max_tokens=256, log=print) != first
