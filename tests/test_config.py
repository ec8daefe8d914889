"""Typed configuration: YAML + dot-list overrides, validation errors that name field, value and fix."""

from __future__ import annotations

import pytest

from megakv.config import ConfigError, MegaKVConfig, ModelConfig, load_config, load_section, save_config


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides_merge_over_defaults(tmp_path):
    path = write(tmp_path, "model:\n  n_layers: 8\n  n_heads: 8\n  n_kv_heads: 2\nrouting:\n  q_cross: 0.25\n")
    cfg = load_config(path, ["model.d_model=512", "routing.strategy=cla:2"])
    assert isinstance(cfg, MegaKVConfig) and isinstance(cfg.model, ModelConfig)
    assert (cfg.model.n_layers, cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.d_model) == (8, 8, 2, 512)
    assert (cfg.routing.q_cross, cfg.routing.strategy) == (0.25, "cla:2")
    assert cfg.model.ffn_hidden == ModelConfig().ffn_hidden  # untouched default


def test_saved_config_reloads_identically(tmp_path):
    cfg = load_config(None, ["model.n_layers=3", "model.rope_scaling.type=llama3", "routing.max_distance=2"])
    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg
    save_config(cfg.model, tmp_path / "model.yaml")
    assert load_section(tmp_path / "model.yaml", ModelConfig, "model") == cfg.model


@pytest.mark.parametrize("overrides,field,words", [
    (["model.n_heads=6", "model.n_kv_heads=4"], "model.n_kv_heads", "n_heads % n_kv_heads != 0"),
    (["model.n_kv_heads=8"], "model.n_kv_heads", "exceeds n_heads"),
    (["model.d_model=250"], "model.d_model", "not divisible by n_heads"),
    (["model.n_layers=0"], "model.n_layers", "must be positive"),
    (["model.family=gpt2"], "model.family", "unknown family"),
    (["model.qk_norm=true"], "model.qk_norm", "family=qwen3"),
    (["model.eos_token_id=9000"], "model.eos_token_id", "outside the vocabulary"),
    (["routing.q_cross=1.5"], "routing.q_cross", "[0, 1]"),
    (["routing.q_cross=-0.1"], "routing.q_cross", "[0, 1]"),
    (["routing.strategy=cla:99"], "routing.strategy", "group size 99"),
    (["routing.strategy=random"], "routing.strategy", "unknown routing strategy"),
    (["routing.max_distance=0"], "routing.max_distance", ">= 1"),
    (["routing.seed=-1"], "routing.seed", ">= 0"),
    (["model.rope_scaling.type=llama3", "model.rope_scaling.factor=0"], "model.rope_scaling", "positive factor"),
    (["model.rope_scaling.type=llama3", "model.rope_scaling.high_freq_factor=1"], "model.rope_scaling",
     "0 < low_freq_factor < high_freq_factor"),
    (["model.n_layer=4"], "model.n_layer", "not in"),
    (["model.n_layers=four"], "model.n_layers", "four"),
])
def test_bad_values_name_the_field_and_the_fix(overrides, field, words):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    message = str(info.value)
    assert info.value.field == field and field in message
    assert words in message
    assert "Fix:" in message


def test_bad_files_and_override_syntax(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["model.n_layers"])
    with pytest.raises(ConfigError, match="model.nope"):
        load_config(write(tmp_path, "model:\n  nope: 1\n"))


def test_more_yaml_files_merge_in_order_with_the_overrides(tmp_path):
    """megakv-data writes data.yaml, 'the data: section to train on them', but megakv-train took one config and
    called a second YAML a malformed override."""
    from pathlib import Path

    section = tmp_path / "data.yaml"
    section.write_text("data:\n  datasets: [d/train]\n  seed: 5\n  valid_fraction: 0.0\n")
    recipe = Path(__file__).resolve().parents[1] / "megakv" / "recipes" / "tiny.yaml"
    cfg = load_config(recipe, ["data.seed=1", str(section), "train.steps=3"])
    assert (cfg.data.datasets, cfg.data.seed, cfg.data.valid_fraction, cfg.train.steps) == (["d/train"], 5, 0.0, 3)
    assert load_config(recipe, [str(section), "data.seed=9"]).data.seed == 9  # later wins
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(recipe, [str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(recipe, ["train.steps"])
