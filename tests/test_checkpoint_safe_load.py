"""Opening a run directory someone sent you runs no code from it: a pickle payload planted in any checkpoint
file (with a manifest re-written to match, as a sender could) is refused, naming the file and the global,
on `--resume auto`, `megakv-generate --model RUN_DIR` and `megakv-convert from-checkpoint`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import STOP_AT, shared_runs, tag
from train_helpers import launch_train

from megakv.cli.convert import main as convert_main
from megakv.cli.generate import main as generate_main
from megakv.safe_load import UnsafeFileError, check_deepspeed_dir
from megakv.train.checkpoint import file_digest


class Payload:
    """Unpickling this runs `touch MARKER` (what a malicious checkpoint would do, less politely)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def plant(tag_dir: Path, name: str, marker: Path) -> None:
    """Add the payload to one .pt file (the rest of its contents kept) and re-record the manifest."""
    path = tag_dir / name
    if name.startswith("rng/"):  # a legacy RNG file in the pickle format megakv used to write
        json_file = path.with_suffix(".json")
        contents = {"python": json.loads(json_file.read_text())["python"], "extra": Payload(marker)}
        json_file.unlink()
    else:
        contents = torch.load(path, weights_only=False)  # our own file, about to be poisoned
        contents["extra"] = Payload(marker)
    torch.save(contents, path)
    state_file = tag_dir / "megakv_state.json"
    state = json.loads(state_file.read_text())
    state["files"] = {str(p.relative_to(tag_dir)): [p.stat().st_size, file_digest(p)]
                      for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != state_file.name}
    state_file.write_text(json.dumps(state))


def test_the_allow_list_covers_what_deepspeed_writes(runs):
    """Every file of real ZeRO-2 checkpoints opens through the weights-only unpickler (the other stages and
    bf16 are covered by the training tests, which resume through the same check)."""
    for step in (2, 4, 6):
        assert check_deepspeed_dir(runs.stopped / "checkpoints" / tag(step)) == 2


@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "rng/rank00000.pt"])
def test_resume_refuses_a_planted_payload(runs, tmp_path, name):
    run_dir = runs.copy_stopped(tmp_path / "run")
    marker = tmp_path / "payload-ran"
    plant(run_dir / "checkpoints" / tag(STOP_AT), name, marker)
    with pytest.raises(UnsafeFileError) as info:
        check_deepspeed_dir(run_dir / "checkpoints" / tag(STOP_AT))
    assert info.value.global_name in ("posix.system", "os.system") and info.value.path.name == Path(name).name
    assert not marker.exists()
    resumed = launch_train(runs.overrides(run_dir), nproc=1, resume=True)
    assert resumed.returncodes == [2], resumed.output[-4000:]
    assert str(run_dir / "checkpoints" / tag(STOP_AT) / name) in resumed.output
    assert "system" in resumed.output and "no code from it ran" in resumed.output
    assert not marker.exists()



def test_a_linked_folder_inside_a_checkpoint_is_refused(runs, tmp_path):
    """The check walks without following links, and DeepSpeed's universal loader lists and loads every file of
    a zero/<param>/ folder through one: a received checkpoint with a linked folder is refused outright."""
    run_dir = runs.copy_stopped(tmp_path / "run")
    marker = tmp_path / "payload-ran"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    torch.save({"x": Payload(marker)}, elsewhere / "fp32.pt")
    tag_dir = run_dir / "checkpoints" / tag(STOP_AT)
    (tag_dir / "zero").mkdir()
    (tag_dir / "zero" / "layers.0.mlp_norm.weight").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(UnsafeFileError, match="holds no links") as info:
        check_deepspeed_dir(tag_dir)
    assert info.value.path == tag_dir / "zero" / "layers.0.mlp_norm.weight"
    resumed = launch_train(runs.overrides(run_dir), nproc=1, resume=True)
    assert resumed.returncodes == [2], resumed.output[-4000:]
    assert "holds no links" in resumed.output and not marker.exists()


def test_generate_and_export_refuse_a_planted_payload(runs, tmp_path, capsys):
    run_dir = runs.copy_stopped(tmp_path / "run")
    marker = tmp_path / "payload-ran"
    model_file = run_dir / "checkpoints" / tag(STOP_AT) / "mp_rank_00_model_states.pt"
    plant(model_file.parent, model_file.name, marker)
    assert generate_main(["--model", str(run_dir), "--prompt", "the king", "--max-new-tokens", "2"]) == 2
    assert str(model_file) in capsys.readouterr().err
    assert convert_main(["from-checkpoint", str(run_dir), str(tmp_path / "exported")]) == 2
    err = capsys.readouterr().err
    assert str(model_file) in err and "system" in err
    assert convert_main(["to-universal", str(run_dir)]) == 2
    assert str(model_file) in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "exported").exists()


def test_loads_from_several_threads_keep_their_allow_list(tmp_path):
    """torch's allow-list is one set per process: without turns, a thread leaving safe_globals removed the
    globals another thread's load still needed (7 of 900 loads refused, measured before the fix)."""
    import threading

    import numpy as np

    from megakv.safe_load import load_weights_only, numpy_globals

    torch.save({"state": np.arange(5, dtype=np.uint32)}, tmp_path / "rng.pt")  # needs numpy's globals
    loaded: list[list[int]] = []
    failures: list[str] = []  # any failure, not only a refusal: an exception in a thread would otherwise vanish

    def load_many():
        for _ in range(300):
            try:
                loaded.append(load_weights_only(tmp_path / "rng.pt", numpy_globals())["state"].tolist())
            except BaseException as e:
                failures.append(repr(e))

    threads = [threading.Thread(target=load_many) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert loaded == [[0, 1, 2, 3, 4]] * 900
