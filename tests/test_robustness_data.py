"""A .bin whose token ids exceed the vocabulary while its .meta.json says otherwise is caught when the
samples are read (a cheap max per piece), naming the file and the document: exit 2, status.json failed,
not an IndexError deep in the embedding."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from checkpoint_helpers import shared_runs
from train_helpers import launch_train, read_status

from megakv.data.indexed import IndexedDataset


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def test_token_ids_beyond_the_vocabulary_are_refused_naming_file_and_document(runs, tmp_path, capsys):
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
    # `megakv-data info`, the checking tool, scans the .bin and says so too (exit 2), naming the sequence
    from megakv.cli.data import main as data_main

    assert data_main(["info", str(prefix)]) == 2
    err = capsys.readouterr().err
    assert f"{prefix}.bin: sequence 0 holds token id 500" in err and "meta.json" in err
    assert data_main(["info", str(runs.dataset)]) == 0  # the intact original passes
    # megakv-merge refuses to carry the false bound into a merged pair
    from megakv.cli.merge import main as merge_main

    merged = tmp_path / "merged" / "all"
    assert merge_main(["--inputs", str(runs.dataset), str(prefix), "--output-prefix", str(merged)]) == 2
    err = capsys.readouterr().err
    assert f"{prefix}.bin holds token id 500" in err and not (merged.parent / "all.idx").exists()
    assert merge_main(["--inputs", str(runs.dataset), "--output-prefix", str(merged)]) == 0
    assert json.loads((merged.parent / "all.meta.json").read_text())["max_token_id"] == IndexedDataset(
        runs.dataset).max_token_id()


def test_a_second_prep_on_the_same_prefix_is_refused_while_the_first_runs(runs, tmp_path):
    import json
    import subprocess
    import sys
    import time

    from train_data import synthetic_text
    from train_helpers import REPO, _child_env

    from megakv.data.indexed import pair_exists

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in synthetic_text(documents=12000, seed=3)))
    prefix = tmp_path / "out" / "d"
    cmd = [sys.executable, "-m", "megakv.cli.prep", "--input", str(corpus), "--tokenizer",
           str(runs.dataset.parent / "tokenizer"), "--output-prefix", str(prefix), "--no-progress"]
    first = subprocess.Popen(cmd, cwd=REPO, env=_child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    lock = prefix.with_name("d.tmp-lock")
    deadline = time.monotonic() + 60
    while not lock.exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0]
        time.sleep(0.01)
    second = subprocess.run(cmd, cwd=REPO, env=_child_env(), capture_output=True, text=True, timeout=120)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out[-2000:]
    assert second.returncode == 2 and "another megakv-prep is writing" in second.stderr, second.stderr[-2000:]
    assert pair_exists(prefix) and not lock.exists()
