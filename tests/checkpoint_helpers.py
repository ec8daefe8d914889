"""Real checkpointed runs shared by the checkpoint and robustness tests (built once per pytest session).

`reference`: 10 steps straight, a checkpoint every 2. `stopped`: the same run stopped by SIGTERM after
step 6 (checkpoints 2, 4, 6; status preempted). Tests copy `stopped` and damage or move its files.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from train_data import prepare_tiny_dataset
from train_helpers import TINY_RECIPE, launch_train

STEPS = 10
STOP_AT = 6


@dataclass(frozen=True)
class Runs:
    dataset: Path
    reference: Path
    stopped: Path

    def overrides(self, run_dir: Path, *extra: str) -> list[str]:
        return [f"data.datasets=[{self.dataset}]", f"train.run_dir={run_dir}", f"train.steps={STEPS}",
                "checkpoint.every=2", "checkpoint.keep_last=3", "logging.tensorboard=false", *extra]

    def copy_stopped(self, target: Path) -> Path:
        shutil.copytree(self.stopped, target)
        return target


def shared_runs(tmp_path_factory) -> Runs:
    root = tmp_path_factory.getbasetemp() / "checkpointed_runs"
    runs = Runs(root / "data" / "data" / "train", root / "reference", root / "stopped")
    if (root / "ready").is_file():
        return runs
    shutil.rmtree(root, ignore_errors=True)
    prepare_tiny_dataset(root / "data")
    for run_dir, extra in ((runs.reference, []), (runs.stopped, [f"train.debug.sigterm_at_step={STOP_AT}"])):
        done = launch_train(runs.overrides(run_dir, *extra), nproc=1)
        assert done.ok, done.output[-4000:]
    (root / "ready").write_text("")
    return runs


def tiny_config(runs: Runs, run_dir: Path, *overrides: str):
    from megakv.config import load_config

    return load_config(TINY_RECIPE, runs.overrides(run_dir, *overrides))


def one_process():
    from megakv.parallel.layout import ParallelLayout

    return ParallelLayout(world_size=1, rank=0, local_rank=0)


def tag(step: int) -> str:
    return f"step_{step:08d}"
