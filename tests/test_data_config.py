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
    # one dataset twice shuffles alike: each sample came twice in a row (500 of 500 pairs, audit)
    ({"datasets": ["d/a", "d/b", "./d/a"]}, "data.datasets", "lists ./d/a more than once"),
    ({"datasets": ["d/a"], "valid_datasets": ["v", "v"]}, "data.valid_datasets", "lists v more than once"),
])
def test_validation_names_the_field_and_the_fix(kwargs, field, words):
    with pytest.raises(ConfigError) as info:
        DataConfig(**kwargs).validate()
    assert info.value.field == field and words in info.value.problem and info.value.fix


def test_a_dataset_too_small_for_the_blend_is_named_with_what_null_weights_mean():
    """With data.weights null a 1,200-token dataset beside 10^8 tokens failed as 'blend weight 1 (dataset 1)':
    a weight nobody set, a dataset by index."""
    from megakv.data.blend import counts_from_weights
    from megakv.data.errors import DataError

    with pytest.raises(DataError) as sizes:
        counts_from_weights([200_000, 1], names=["d/big", "d/tiny"], from_sizes=True)
    assert "d/tiny holds 1 samples" in sizes.value.problem and "data.weights null" in sizes.value.problem
    assert "give data.weights explicitly" in sizes.value.fix
    with pytest.raises(DataError, match="blend weight 1e-06 of d/tiny is below 1/65536"):
        counts_from_weights([1.0, 1e-6], names=["d/big", "d/tiny"])
    assert counts_from_weights([1.0, 1e-4], names=["d/big", "d/small"]) == [65529, 7]
