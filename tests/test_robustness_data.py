"""A .bin whose token ids exceed the vocabulary while its .meta.json says otherwise is caught when the
samples are read (a cheap max per piece), naming the file and the document: exit 2, status.json failed,
not an IndexError deep in the embedding."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from checkpoint_helpers import shared_runs
from train_helpers import launch_train, read_status

from megakv.data.indexed import IndexedDataset


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def test_token_ids_beyond_the_vocabulary_are_refused_naming_file_and_document(runs, tmp_path):
    copy = tmp_path / "data"
    shutil.copytree(runs.dataset.parent, copy)
    prefix = copy / "train"
    dtype = IndexedDataset(prefix).get(0).dtype
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r+")
    tokens[::50] = 500  # beyond the tokenizer's 300 ids and the model's 320 rows; .meta.json still says < 300
    tokens.flush()
    del tokens
    run_dir = tmp_path / "run"
    done = launch_train([*runs.overrides(run_dir), f"data.datasets=[{prefix}]"], nproc=1)
    assert done.returncodes == [2], done.output[-3000:]
    assert f"{prefix}.bin: document" in done.output and "token id 500" in done.output
    assert "IndexError" not in done.output
    status = read_status(run_dir)
    assert status["state"] == "failed" and "token id 500" in status["error"]
