"""Finding the checkpoint to resume from never depends on `checkpoints/latest` alone, a fresh start never
writes over a directory holding checkpoints, and a run never prunes checkpoints another run wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from checkpoint_helpers import STOP_AT, one_process, shared_runs, tag, tiny_config
from train_helpers import TINY_RECIPE, launch_train, read_metrics, step_losses

from megakv.cli.train import main as train_main
from megakv.config import ConfigError
from megakv.train.checkpoint import file_digest
from megakv.train.preflight import preflight


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return shared_runs(tmp_path_factory)


def _damage_latest(ckpts: Path, how: str) -> str:
    """Break `latest` one way; returns the tag a correct discovery must pick."""
    latest = ckpts / "latest"
    if how == "missing":
        latest.unlink()
    elif how == "empty":
        latest.write_text("")
    elif how == "names_absent":
        latest.write_text("step_00000099\n")
    elif how == "names_incomplete":  # a step directory without its completeness marker
        (ckpts / tag(STOP_AT) / "megakv_state.json").unlink()
        return tag(STOP_AT - 2)
    return tag(STOP_AT)


@pytest.mark.parametrize("how", ["missing", "empty", "names_absent", "names_incomplete"])
def test_resume_falls_back_to_the_newest_complete_step_directory(runs, tmp_path, how):
    run_dir = runs.copy_stopped(tmp_path / "run")
    expected = _damage_latest(run_dir / "checkpoints", how)
    launch = preflight(tiny_config(runs, run_dir, "checkpoint.resume=auto"), one_process())
    assert launch.resume is not None and launch.resume.tag == expected
    assert launch.resume.state.step == int(expected[-8:])
    assert any("latest" in notice for notice in launch.resume.notices), launch.resume.notices


@pytest.mark.parametrize("how", ["missing", "empty"])
def test_fresh_start_in_a_directory_holding_checkpoints_is_refused(runs, tmp_path, capsys, how):
    run_dir = runs.copy_stopped(tmp_path / "run")
    _damage_latest(run_dir / "checkpoints", how)
    with pytest.raises(ConfigError) as info:
        preflight(tiny_config(runs, run_dir), one_process())
    assert info.value.field == "checkpoint.resume"
    assert "--resume auto" in info.value.fix and "train.run_dir" in info.value.fix
    assert tag(STOP_AT) in info.value.problem
    # through the CLI: exit code 2, nothing written over
    before = {p.name: file_digest(p) for p in (run_dir / "checkpoints" / tag(2)).iterdir() if p.is_file()}
    assert train_main([str(TINY_RECIPE), *runs.overrides(run_dir)]) == 2
    err = capsys.readouterr().err
    assert "--resume auto" in err and "train.run_dir" in err
    assert before == {p.name: file_digest(p) for p in (run_dir / "checkpoints" / tag(2)).iterdir() if p.is_file()}


def test_resume_without_latest_continues_bit_exactly_and_keeps_another_runs_checkpoint(runs, tmp_path):
    run_dir = runs.copy_stopped(tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    (ckpts / "latest").unlink()
    # step 2 now belongs to another run (as if copied in): it must survive this run's pruning
    foreign_state = ckpts / tag(2) / "megakv_state.json"
    raw = json.loads(foreign_state.read_text())
    raw["run_id"] = "another-run"
    foreign_state.write_text(json.dumps(raw))
    foreign = {p.name: file_digest(p) for p in (ckpts / tag(2)).rglob("*") if p.is_file()}
    kept = {p.name: file_digest(p) for p in (ckpts / tag(STOP_AT)).rglob("*") if p.is_file()}

    resumed = launch_train(runs.overrides(run_dir), nproc=1, resume=True)
    assert resumed.ok, resumed.output[-4000:]
    assert f"resumed from {ckpts / tag(STOP_AT)} at step {STOP_AT}" in resumed.output
    losses, reference = step_losses(run_dir), step_losses(runs.reference)
    for step in range(STOP_AT + 1, 11):
        assert losses[step] == reference[step], step  # bit for bit
    # keep_last=3 prunes this run's step 4 only; the other run's step 2 and the resumed step 6 are untouched
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith("step_")) == [
        tag(2), tag(6), tag(8), tag(10)]
    assert foreign == {p.name: file_digest(p) for p in (ckpts / tag(2)).rglob("*") if p.is_file()}
    assert kept == {p.name: file_digest(p) for p in (ckpts / tag(STOP_AT)).rglob("*") if p.is_file()}
    # the run record holds every step once
    steps = [r["step"] for r in read_metrics(run_dir) if "loss_exact" in r]
    assert steps == list(range(1, 11))


def test_exporting_a_live_run_whose_checkpoint_is_pruned_meanwhile_reads_the_newest(runs, tmp_path, monkeypatch,
                                                                                     capsys):
    """A live run removes its oldest checkpoint right after saving a newer one (checkpoint.keep_last), so the one an
    export chose can vanish while it is read; the export failed, calling it damaged. The run's prune is played
    here, deterministically, at the moment the export starts reading (a concurrent run would hit it by chance)."""
    import shutil

    import megakv.train.export as export
    from megakv.train.export import consolidated_state_dict

    run_dir = runs.copy_stopped(tmp_path / "run")
    ckpts = run_dir / "checkpoints"
    (ckpts / "latest").write_text(tag(STOP_AT - 2))  # the run's newest: the one the export first chooses
    newer = ckpts / tag(STOP_AT)
    hidden = shutil.move(str(newer), str(tmp_path / "not-yet-saved"))
    real_check = export.check_deepspeed_dir
    pruned = []

    def the_run_saves_and_prunes(directory):
        if not pruned:  # the run saves step STOP_AT and removes the one being read
            pruned.append(Path(directory).name)
            shutil.move(hidden, str(newer))
            (ckpts / "latest").write_text(tag(STOP_AT))
            shutil.rmtree(directory)
        return real_check(directory)

    monkeypatch.setattr(export, "check_deepspeed_dir", the_run_saves_and_prunes)
    _cfg, weights, chosen = consolidated_state_dict(run_dir)
    assert pruned == [tag(STOP_AT - 2)] and chosen == tag(STOP_AT)
    assert f"{tag(STOP_AT - 2)} of {run_dir} was removed while it was read" in capsys.readouterr().err
    monkeypatch.setattr(export, "check_deepspeed_dir", real_check)
    _cfg, again, _ = consolidated_state_dict(run_dir)
    assert weights.keys() == again.keys() and all(torch.equal(weights[k], again[k]) for k in weights)
    # a checkpoint that is still there and fails to read is an error, not a reason to read another one
    monkeypatch.setattr(export, "check_deepspeed_dir", lambda directory: (_ for _ in ()).throw(OSError("disk")))
    with pytest.raises(OSError, match="disk"):
        consolidated_state_dict(run_dir)
