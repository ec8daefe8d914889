"""Train, resume and score the study's models, caching each result under the part's directory.

A run is `megakv-train` in a subprocess (torchrun when nproc > 1) with `--resume auto`, so an interrupted
study continues from the run's last checkpoint, and a finished run (status.json "finished") is not
trained again. Held-out losses per retention are cached in a small json next to the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from megakv.eval.data import load_eval_tokens, make_windows
from megakv.eval.loss import evaluate_plans
from megakv.model_paths import resolve_model
from megakv.train.run_dir import read_status, write_json_atomically

Log = Callable[[str], None]


def is_finished(run_dir: Path) -> bool:
    status = read_status(run_dir)
    return status is not None and status.get("state") == "finished"


def train_command(config: Path, run_dir: Path, overrides: Sequence[str], nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "megakv.cli.train"]
    if nproc > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "-m", "megakv.cli.train"]
    return [*launcher, str(config), f"train.run_dir={run_dir}", *overrides, "--resume", "auto"]


def train_run(config: Path, run_dir: Path, overrides: Sequence[str], *, log: Log, nproc: int = 1,
              threads: int = 1) -> float:
    """Train (or finish training) one model; returns the seconds spent here (0 when it was cached)."""
    if is_finished(run_dir):
        log(f"cached: {run_dir}")
        return 0.0
    log(f"training {run_dir.name}: {' '.join(overrides)}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    subprocess.run(train_command(config, run_dir, overrides, nproc), check=True, env=env)
    if not is_finished(run_dir):
        raise RuntimeError(f"{run_dir}: megakv-train returned without finishing (status.json: "
                           f"{read_status(run_dir)}); rerun the study to resume it")
    return time.perf_counter() - start


def retention_losses(run_dir: Path, data: Path, retains: Sequence[str], *, max_tokens: int, seq_len: int | None = None,
                     cache_name: str = "retention_losses.json", log: Log) -> dict[str, float]:
    """Held-out loss of the run's model at each retention on the first `max_tokens` tokens of `data`.

    Cached in run_dir/cache_name, keyed by the data, token budget and window length; recomputed only for
    retentions missing from it.
    """
    cache_path = run_dir / cache_name
    key = f"{Path(data).resolve()}|{max_tokens}|{seq_len}"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    losses = dict(cache.get(key, {}))
    missing = [r for r in retains if r not in losses]
    if missing:
        model, _ = resolve_model(run_dir)
        model.eval()
        tokens = load_eval_tokens(data, max_tokens=max_tokens)
        windows = make_windows(tokens, seq_len or model.cfg.max_seq_len, model.cfg.vocab_size)
        log(f"scoring {run_dir.name} at {' '.join(missing)} on {len(tokens)} tokens")
        with torch.no_grad():
            for result in evaluate_plans(model, missing, windows):
                losses[result.retain] = result.loss
        cache[key] = losses
        write_json_atomically(cache_path, cache)
    return {r: losses[r] for r in retains}
