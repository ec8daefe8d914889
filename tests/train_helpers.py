"""Shared utilities for the training tests: launch `megakv-train` as real processes, read what runs wrote.

Launches go through the real CLI (`python -m megakv.cli.train`) as separate processes with the env://
variables torchrun would set (or through torchrun / the deepspeed launcher themselves). Results are read
from the files a run writes (metrics.jsonl, status.json, checkpoints), never judged by exit codes alone.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY_RECIPE = REPO / "megakv" / "recipes" / "tiny.yaml"
CHILD_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Launch:
    returncodes: list[int]
    output: str  # stdout + stderr of every process, rank-prefixed by the processes themselves

    @property
    def ok(self) -> bool:
        return all(code == 0 for code in self.returncodes)


def _child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(CHILD_ENV)
    env.update(extra or {})
    return env


def train_args(config: Path | str, overrides: list[str], resume: bool) -> list[str]:
    return [str(config), *overrides, *(["--resume", "auto"] if resume else [])]


def launch_train(overrides: list[str], nproc: int = 2, resume: bool = False, config: Path | str = TINY_RECIPE,
                 launcher: str = "env", timeout: float = 300) -> Launch:
    """Run megakv-train on `nproc` processes; launcher: env (plain processes), torchrun or deepspeed."""
    args = train_args(config, overrides, resume)
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port()), "-m", "megakv.cli.train", *args]
        return _run_one(cmd, _child_env(), timeout)
    if launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port",
               str(free_port()), "--module", "megakv.cli.train", *args]
        return _run_one(cmd, _child_env(), timeout)
    if launcher != "env":
        raise ValueError(f"unknown launcher {launcher!r}")
    port = str(free_port())
    procs = []
    for rank in range(nproc):
        env = _child_env({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                          "LOCAL_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
        if nproc == 1:  # a bare single process, as a user would start it
            env = _child_env()
        procs.append(subprocess.Popen([sys.executable, "-m", "megakv.cli.train", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return _collect(procs, timeout)


def _run_one(cmd: list[str], env: dict[str, str], timeout: float) -> Launch:
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return _collect([proc], timeout)


def _collect(procs: list[subprocess.Popen], timeout: float) -> Launch:
    deadline = time.monotonic() + timeout
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                if p.poll() is None:
                    os.kill(p.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            out += "\n<killed by the test: timeout>"
        outputs.append(out)
    return Launch([p.returncode for p in procs], "\n".join(outputs))


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_losses(run_dir: Path) -> dict[int, float]:
    """Exact training loss per step (the last record wins when a resumed run repeated a step)."""
    return {r["step"]: float(r["loss_exact"]) for r in read_metrics(run_dir) if "loss_exact" in r}


def validation_records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if any(k.startswith("valid/") for k in r)]


def read_status(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def latest_tag(run_dir: Path) -> str:
    return (Path(run_dir) / "checkpoints" / "latest").read_text().strip()


def parse_plan(text: str):
    """The RoutingPlan that str() printed as `text` ('0 0 2 1 4 4')."""
    from megakv.routing import RoutingPlan

    return RoutingPlan(tuple(int(t) for t in text.split()))


def plan_traces(run_dir: Path) -> dict[int, list[str]]:
    logs = Path(run_dir) / "logs"
    return {int(p.stem.removeprefix("plans_rank")): p.read_text().splitlines() for p in logs.glob("plans_rank*.txt")}

