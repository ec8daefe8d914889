"""Chaos test of checkpointing: kill -9 a rank at random points of training and of saving, resume with
--resume auto, and count the trials that continued bit for bit from the last complete checkpoint.

Each trial is a real 2-process `megakv-train` launch of the tiny recipe (gloo, ZeRO-2, a checkpoint every
2 steps). One randomly chosen rank is SIGKILLed either at a random moment of training or 0-30 ms after a
save has started (its temporary directory appeared). The surviving rank must exit by itself (the launch
guard / gloo) within --peer-timeout seconds. Then the newest intact checkpoint is computed from the files
(megakv.train.checkpoint.discover), the run is resumed, and the trial counts as exact when the resume
started from that checkpoint, every loss after it equals the uninterrupted reference run bit for bit and
the final weights are identical.

  .venv/bin/python benchmarks/chaos.py [--trials 20] [--seed 0] [--steps 12] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "megakv" / "recipes" / "tiny.yaml"
ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore::FutureWarning"}
NPROC = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def synthetic_dataset(root: Path) -> Path:
    from megakv.data.preprocess import preprocess
    from megakv.data.tokenizer import train_sentencepiece

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 6))) for _ in range(400)]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(60, 200))) for _ in range(600)]
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    train_sentencepiece(docs, root / "tokenizer_src", 300)
    prefix = root / "data" / "train"
    preprocess([str(corpus)], root / "tokenizer_src", prefix, workers=1, progress=False)
    return prefix


def start(run_dir: Path, overrides: list[str], resume: bool) -> list[subprocess.Popen]:
    port = str(_free_port())
    args = [str(TINY), f"train.run_dir={run_dir}", *overrides, *(["--resume", "auto"] if resume else [])]
    procs = []
    for rank in range(NPROC):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
        env.update(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(NPROC), LOCAL_SIZE=str(NPROC),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "megakv.cli.train", *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def finish(procs: list[subprocess.Popen], timeout: float) -> tuple[list[int | None], str]:
    deadline, outs = time.monotonic() + timeout, []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            out += "\n<killed: timeout>"
            proc.returncode = None
        outs.append(out)
    return [p.returncode for p in procs], "\n".join(outs)


def losses(run_dir: Path) -> dict[int, str]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss_exact" in record:
            out[record["step"]] = record["loss_exact"]
    return out


def weights(run_dir: Path):
    from megakv.train.export import consolidated_state_dict

    return consolidated_state_dict(run_dir)[1]


@dataclass
class Trial:
    phase: str  # training | saving
    victim: int
    killed_at: str  # what the run had reached
    peer_exit_s: float | None
    resumed_from: str | None
    exact: bool
    note: str = ""


def wait_for(predicate, timeout: float, poll: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def one_trial(root: Path, index: int, rng: random.Random, overrides: list[str], reference: dict,
              reference_weights: dict, steps: int, peer_timeout: float) -> Trial:
    import torch

    from megakv.train.checkpoint import discover

    run_dir = root / f"trial_{index:02d}"
    ckpts = run_dir / "checkpoints"
    phase, victim = rng.choice(["training", "saving"]), rng.randrange(NPROC)
    procs = start(run_dir, overrides, resume=False)
    metrics = run_dir / "metrics.jsonl"
    if phase == "training":
        started = wait_for(lambda: metrics.is_file() and metrics.stat().st_size > 0, 120, 0.01)
        time.sleep(rng.uniform(0.0, 1.2))
    else:
        target = rng.randrange(1, steps // 2) * 2  # one of the periodic saves
        started = wait_for(lambda: (ckpts / f".tmp-step_{target:08d}").exists(), 120, 0.0005)
        time.sleep(rng.uniform(0.0, 0.03))
    if not started or procs[victim].poll() is not None:
        finish(procs, 30)
        return Trial(phase, victim, "run ended before the kill", None, None, False, "no kill happened")
    reached = max(losses(run_dir)) if metrics.is_file() and losses(run_dir) else 0
    os.kill(procs[victim].pid, signal.SIGKILL)
    killed = time.monotonic()
    peer = procs[1 - victim]
    try:
        peer.wait(timeout=peer_timeout)
        peer_exit = time.monotonic() - killed
    except subprocess.TimeoutExpired:
        peer_exit = None
    finish(procs, 5)
    found = discover(ckpts).found
    expected = found[0] if found else None
    resumed = start(run_dir, overrides, resume=True)
    codes, out = finish(resumed, 300)
    if codes != [0] * NPROC:
        return Trial(phase, victim, f"step {reached}", peer_exit, None, False, f"resume failed {codes}: {out[-800:]}")
    start_step = int(expected[-8:]) if expected else 0
    marker = f"resumed from {ckpts / expected} at step {start_step}" if expected else None
    if marker is not None and marker not in out:
        return Trial(phase, victim, f"step {reached}", peer_exit, None, False, "did not resume from " + str(expected))
    got = losses(run_dir)
    same_losses = all(got.get(s) == reference[s] for s in range(start_step + 1, steps + 1))
    mine = weights(run_dir)
    same_weights = mine.keys() == reference_weights.keys() and all(
        torch.equal(mine[k], reference_weights[k]) for k in mine)
    note = "" if same_losses and same_weights else f"losses equal: {same_losses}, weights equal: {same_weights}"
    return Trial(phase, victim, f"step {reached}", peer_exit, expected or "fresh start", same_losses and same_weights,
                 note)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--peer-timeout", type=float, default=60.0, help="seconds the surviving rank may take")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error("--trials must be >= 1")
    os.environ.update(ENV)
    root = args.keep or Path(tempfile.mkdtemp(prefix="megakv-chaos-"))
    rng = random.Random(args.seed)
    try:
        prefix = synthetic_dataset(root / "dataset")
        overrides = [f"data.datasets=[{prefix}]", f"train.steps={args.steps}", "checkpoint.every=2",
                     "checkpoint.keep_last=3", "logging.tensorboard=false", "parallel.timeout=30"]
        reference_dir = root / "reference"
        codes, out = finish(start(reference_dir, overrides, resume=False), 300)
        if codes != [0] * NPROC:
            print(f"reference run failed {codes}:\n{out[-3000:]}", file=sys.stderr)
            return 1
        reference, reference_weights = losses(reference_dir), weights(reference_dir)
        trials = []
        for index in range(args.trials):
            trial = one_trial(root, index, rng, overrides, reference, reference_weights, args.steps,
                              args.peer_timeout)
            trials.append(trial)
            peer = f"{trial.peer_exit_s:.2f}s" if trial.peer_exit_s is not None else "HUNG"
            print(f"trial {index + 1:2d}: kill -9 rank {trial.victim} while {trial.phase:8s} ({trial.killed_at}); "
                  f"peer exited after {peer}; resumed from {trial.resumed_from}: "
                  f"{'bit-exact' if trial.exact else 'NOT EXACT ' + trial.note}", flush=True)
        exact = sum(t.exact for t in trials)
        saving = [t for t in trials if t.phase == "saving"]
        peers = [t.peer_exit_s for t in trials if t.peer_exit_s is not None]
        print(f"\nresumed bit-exactly from the last complete checkpoint: {exact}/{len(trials)} "
              f"({sum(t.exact for t in saving)}/{len(saving)} killed while saving, "
              f"{exact - sum(t.exact for t in saving)}/{len(trials) - len(saving)} while training); "
              f"surviving rank exited by itself in {len(peers)}/{len(trials)} "
              f"(max {max(peers) if peers else float('nan'):.2f}s)")
        return 0 if exact == len(trials) and len(peers) == len(trials) else 1  # a hung survivor fails too
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
