"""DataConfig: OmegaConf-compatible, validated with errors that name the field and the fix."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from megakv.config.data import DataConfig
from megakv.config.errors import ConfigError


def test_merges_from_yaml_and_overrides():
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig),
                             OmegaConf.create("datasets: [d/a, d/b]\nweights: [3, 1]\nvalid_fraction: 0.05\n"),
                             OmegaConf.from_dotlist(["seed=7"]))
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DataConfig) and cfg.weights == [3.0, 1.0] and cfg.seed == 7
    cfg.validate()
    assert DataConfig(datasets=["x"]).tokenizer is None and DataConfig().cache_dir is None


@pytest.mark.parametrize("kwargs,field,words", [
    ({}, "data.datasets", "no training datasets"),
    ({"datasets": ["d/a.bin"]}, "data.datasets", "not a dataset prefix"),
    ({"datasets": ["d/a"], "weights": [1.0, 2.0]}, "data.weights", "2 weights for 1 datasets"),
    ({"datasets": ["d/a"], "weights": [0.0]}, "data.weights", "positive"),
    ({"datasets": ["d/a"], "valid_fraction": 1.0}, "data.valid_fraction", "[0, 1)"),
    ({"datasets": ["d/a"], "seed": -1}, "data.seed", "2**32"),
    ({"datasets": ["d/a"], "valid_datasets": ["v.idx"]}, "data.valid_datasets", "not a dataset prefix"),
])
def test_validation_names_the_field_and_the_fix(kwargs, field, words):
    with pytest.raises(ConfigError) as info:
        DataConfig(**kwargs).validate()
    assert info.value.field == field and words in info.value.problem and info.value.fix
