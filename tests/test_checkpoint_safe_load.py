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


def _rerecord(tag_dir: Path) -> None:
    """Re-record the manifest after planting files, as a sender could."""
    state_file = tag_dir / "megakv_state.json"
    state = json.loads(state_file.read_text())
    state["files"] = {str(p.relative_to(tag_dir)): [p.stat().st_size, file_digest(p)]
                      for p in sorted(tag_dir.rglob("*")) if p.is_file() and p.name != state_file.name}
    state_file.write_text(json.dumps(state))


def test_to_universal_refuses_a_payload_in_a_file_not_named_pt(runs, tmp_path, capsys):
    """ds_to_universal opens every file whose name starts with mp_rank_, whatever it ends in: the check covers
    every file but megakv's JSON, and the conversion itself runs with loads forced weights-only."""
    run_dir = runs.copy_stopped(tmp_path / "run")
    marker = tmp_path / "payload-ran"
    tag_dir = run_dir / "checkpoints" / tag(STOP_AT)
    torch.save(Payload(marker), tag_dir / "mp_rank_00_extra")
    _rerecord(tag_dir)
    assert convert_main(["to-universal", str(run_dir)]) == 2
    assert str(tag_dir / "mp_rank_00_extra") in capsys.readouterr().err
    assert not marker.exists()
    # the second guard alone: DeepSpeed's converter run through megakv's wrapper, without the check first
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "megakv.train.safe_ds_to_universal", "--input_folder",
                           str(tag_dir), "--output_folder", str(tmp_path / "out"), "--inject_missing_state"],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "posix.system" in done.stderr + done.stdout
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../../escaped", "/abs/escaped", "layers..0"])
def test_a_parameter_name_that_is_a_path_is_refused(runs, tmp_path, capsys, name):
    """Conversions make a folder per parameter name: a received checkpoint naming a parameter '../../x' or '/x'
    had them read and write outside the checkpoint. Such a name is refused before anything reads it."""
    run_dir = runs.copy_stopped(tmp_path / "run")
    tag_dir = run_dir / "checkpoints" / tag(STOP_AT)
    model_file = tag_dir / "mp_rank_00_model_states.pt"
    contents = torch.load(model_file, weights_only=False)  # our own file, about to be altered
    contents["param_shapes"] = [type(group)((name if key == "lm_head.weight" else key, shape)
                                            for key, shape in group.items()) for group in contents["param_shapes"]]
    torch.save(contents, model_file)
    _rerecord(tag_dir)
    with pytest.raises(UnsafeFileError, match="not a dotted parameter name"):
        check_deepspeed_dir(tag_dir)
    assert convert_main(["to-universal", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert str(model_file) in err and repr(name) in err
    assert not (tmp_path / "escaped").exists() and not list(run_dir.rglob("*escaped*"))


def test_a_link_inside_a_run_directory_is_refused_before_anything_is_written(runs, tmp_path, capsys):
    """A received run directory whose log file or checkpoint pointer is a link had a resume append its log to,
    and a conversion write its pointer through, any file the user can write. Links inside a run directory are
    refused (exit 2, nothing written); the run directory itself may be a link."""
    run_dir = runs.copy_stopped(tmp_path / "run")
    victim = tmp_path / "precious.txt"
    victim.write_text("precious\n")
    log_file = run_dir / "logs" / "rank0.log"
    log_file.unlink(missing_ok=True)
    log_file.symlink_to(victim)
    resumed = launch_train(runs.overrides(run_dir), nproc=1, resume=True)
    assert resumed.returncodes == [2], resumed.output[-4000:]
    assert f"{log_file} is a link" in resumed.output and "put the whole train.run_dir there" in resumed.output
    log_file.unlink()
    (run_dir / "checkpoints" / ".tmp-latest_universal").symlink_to(victim)
    assert convert_main(["to-universal", str(run_dir)]) == 2
    assert convert_main(["from-checkpoint", str(run_dir), str(tmp_path / "exported")]) == 2
    assert capsys.readouterr().err.count(".tmp-latest_universal is a link") == 2
    assert victim.read_text() == "precious\n" and not (tmp_path / "exported").exists()
    (run_dir / "checkpoints" / ".tmp-latest_universal").unlink()
    linked = tmp_path / "linked-run"
    linked.symlink_to(run_dir, target_is_directory=True)
    assert convert_main(["from-checkpoint", str(linked), str(tmp_path / "exported")]) == 0


def test_a_manifest_naming_files_outside_the_checkpoint_is_damage(runs, tmp_path):
    """Names in megakv_state.json are checked before any is opened; shown with repr (a newline in a name was
    written into the log as a line of its own)."""
    from megakv.train.checkpoint import verify

    run_dir = runs.copy_stopped(tmp_path / "run")
    tag_dir = run_dir / "checkpoints" / tag(STOP_AT)
    state_file = tag_dir / "megakv_state.json"
    original = json.loads(state_file.read_text())
    for name in ("../../../etc/hostname", "/etc/hostname", "x\ntouch /tmp/owned\n"):
        state = dict(original, files={**original["files"], name: [1, "0" * 64]})
        state_file.write_text(json.dumps(state))
        assert verify(tag_dir) == f"{state_file} lists {name!r}, which is not a file name inside the checkpoint"


def test_a_payload_named_like_json_is_checked_too(runs, tmp_path):
    """The check skipped every *.json, but DeepSpeed's converter opens every mp_rank_* file whatever its suffix;
    only megakv's own JSON names (the train state, RNG states, split dimensions) are exempt."""
    run_dir = runs.copy_stopped(tmp_path / "run")
    marker = tmp_path / "payload-ran"
    tag_dir = run_dir / "checkpoints" / tag(STOP_AT)
    torch.save(Payload(marker), tag_dir / "mp_rank_01.json")
    with pytest.raises(UnsafeFileError) as info:
        check_deepspeed_dir(tag_dir)
    assert info.value.path.name == "mp_rank_01.json" and not marker.exists()


def test_deepspeeds_own_loads_run_forced_weights_only(tmp_path):
    """The second guard around DeepSpeed's loaders (resume, export's zero_to_fp32 and pipeline masters, the
    universal converter): a file the check missed, loaded with weights_only=False inside, is refused as an
    UnsafeFileError naming the checkpoint and the global, and runs nothing."""
    from megakv.safe_load import FORCE_WEIGHTS_ONLY, forced_weights_only

    marker = tmp_path / "payload-ran"
    torch.save({"x": Payload(marker)}, tmp_path / "planted.pt")
    torch.save({"scale": torch.ones(2)}, tmp_path / "plain.pt")
    before = os.environ.get(FORCE_WEIGHTS_ONLY)
    with pytest.raises(UnsafeFileError, match="no code from it ran") as info:
        with forced_weights_only(tmp_path):
            torch.load(tmp_path / "planted.pt", weights_only=False)
    assert info.value.path == tmp_path and info.value.global_name in ("posix.system", "os.system")
    with forced_weights_only(tmp_path):
        assert torch.equal(torch.load(tmp_path / "plain.pt", weights_only=False)["scale"], torch.ones(2))
    assert not marker.exists() and os.environ.get(FORCE_WEIGHTS_ONLY) == before


def test_a_pipeline_layer_file_is_read_weights_only(tmp_path):
    """megakv's own reading of a pipeline checkpoint (export, universal conversion) opens the layer files
    through the weights-only loader too: a planted payload is an UnsafeFileError naming the file and the
    global (not a bare UnpicklingError), and runs nothing."""
    from megakv.parallel.pipeline_files import layer_files_state

    marker = tmp_path / "payload-ran"
    name = "layer_01-model_00-model_states.pt"
    torch.save({"block.attn.q_proj.weight": torch.ones(2, 2), "extra": Payload(marker)}, tmp_path / name)
    with pytest.raises(UnsafeFileError, match="no code from it ran") as info:
        layer_files_state(tmp_path, n_layers=2)
    assert info.value.path == tmp_path / name and info.value.global_name in ("posix.system", "os.system")
    assert not marker.exists()


# megakv-train with the first guard switched off: what a file check_deepspeed_dir missed would meet
_WITHOUT_THE_CHECK = ("import sys, megakv.safe_load as s; s.check_deepspeed_dir = lambda directory: 0; "
                      "from megakv.cli.train import main; sys.exit(main(sys.argv[1:]))")


def test_resume_loads_forced_weights_only_behind_the_check(runs, tmp_path):
    """Resume's DeepSpeed load is the second guard's too: with the file check switched off in the process (as if
    it had missed the file), a planted payload is still refused, exit 2 naming the checkpoint, and never runs."""
    import subprocess
    import sys

    from train_helpers import REPO, TINY_RECIPE, _child_env, train_args

    run_dir = runs.copy_stopped(tmp_path / "run")
    marker = tmp_path / "payload-ran"
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    plant(run_dir / "checkpoints" / tag(STOP_AT), name, marker)
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_THE_CHECK, *train_args(
        TINY_RECIPE, runs.overrides(run_dir), resume=True)], cwd=REPO, env=_child_env(),
        capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-4000:]
    assert str(run_dir / "checkpoints" / tag(STOP_AT)) in output and "no code from it ran" in output
    assert "system" in output and "Traceback" not in output
    assert not marker.exists()
