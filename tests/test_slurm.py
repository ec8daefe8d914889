"""The project's SLURM scripts, submitted unchanged to a real SLURM cluster running on this machine.

One cluster (munged + slurmctld + 2 slurmd = 2 emulated nodes) serves the whole module; see
megakv/testing/slurm_cluster.py. Needs root; installs Debian's slurm/munge packages when missing.
Jobs run the real `megakv-train` (tiny recipe) and the real data-preparation CLIs; results are read from the files
the jobs write, and from SLURM's own view of the jobs (`scontrol show job`, the job-completion log).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_data import prepare_tiny_dataset, synthetic_text
from train_helpers import TINY_RECIPE, latest_tag, launch_train, plan_traces, read_status, step_losses

from megakv.testing.slurm_cluster import LocalSlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "slurm" / "pretrain.sbatch"
ALLREDUCE_CHECK = REPO / "megakv" / "testing" / "allreduce_check.py"
PREP_ARRAY = REPO / "data_prep" / "preprocess_array.sbatch"
PREP_MERGE = REPO / "data_prep" / "merge.sbatch"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("the local SLURM cluster runs its daemons as root")
    with LocalSlurmCluster(tmp_path_factory.mktemp("slurm"), nodes=2) as c:
        yield c


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return prepare_tiny_dataset(tmp_path_factory.mktemp("slurm_data"))


def job_env() -> dict[str, str]:
    """What a user sets before sbatch: the environment with megakv installed (the interpreter running the tests)."""
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1"}
    if sys.prefix != sys.base_prefix:
        env["MEGAKV_VENV"] = sys.prefix
    else:
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return env


def job_output(submit_dir: Path, job_id: int) -> str:
    path = submit_dir / f"megakv-pretrain-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def assert_completed(cluster: LocalSlurmCluster, job_id: int, records: list[dict], output: str) -> None:
    states = [(r.get("JobState"), r.get("ExitCode")) for r in records]
    assert all(s == ("COMPLETED", "0:0") for s in states), (
        f"job {job_id} ended {states}\n--- job output\n{output}\n--- daemons\n{cluster.diagnostics()}"
    )


@pytest.mark.parametrize("task_options", [[], ["--ntasks-per-node=2", "--cpus-per-task=1"]])
def test_two_node_launch_allreduce(cluster, tmp_path, task_options):
    """pretrain.sbatch's launch path on its own: one torchrun per node, node ranks from SLURM, rendezvous on the
    first node at the job-id port; the smoke-test script all-reduces across both nodes. Submitted with several
    tasks per node (as for frameworks that run one task per GPU) it still starts one torchrun per node: srun
    inherited the job's task count and started two per node, which fought over the port (SLURM audit)."""
    env = {**job_env(), "MEGAKV_TRAIN": str(ALLREDUCE_CHECK)}
    job = cluster.sbatch(PRETRAIN, "unused.yaml", options=["--nodes=2", *task_options], env=env, cwd=tmp_path)
    records = cluster.wait(job, timeout=90)
    out = job_output(tmp_path, job)
    assert_completed(cluster, job, records, out)
    assert records[0]["NodeList"] == "node[1-2]"
    # Rendezvous on the first node, by name (or by SLURM's NodeAddr where names do not resolve), port from the job id.
    master = "node1" if cluster.hosts_namespace else "127.0.0.1"
    assert f"master={master}:{10000 + job % 20000}" in out, out
    # srun --label: node task 0 holds rank 0, node task 1 holds rank 1; both all-reduced correctly.
    assert re.search(r"^0: \[rank 0/2\] node=0 .* ok$", out, re.M), out
    assert re.search(r"^1: \[rank 1/2\] node=1 .* ok$", out, re.M), out
    assert "ranks span nodes 0,1" in out


def test_two_node_training(cluster, dataset, tmp_path):
    """megakv-train through pretrain.sbatch on 2 nodes x 1 rank: one data-parallel group spanning both nodes trains,
    every rank follows the same routing plans, and the run ends with a complete checkpoint."""
    run_dir = tmp_path / "run"
    job = cluster.sbatch(
        PRETRAIN, str(TINY_RECIPE), f"data.datasets=[{dataset}]", f"train.run_dir={run_dir}", "train.steps=6",
        "train.debug.check_plans=true", "logging.other_ranks_console=info",
        options=["--nodes=2"], env=job_env(), cwd=tmp_path,
    )
    records = cluster.wait(job, timeout=150)
    out = job_output(tmp_path, job)
    assert_completed(cluster, job, records, out)
    assert records[0]["NodeList"] == "node[1-2]"
    # srun --label numbers the node tasks: rank 0 logged from node task 0, rank 1 from node task 1.
    assert re.search(r"^0: \[rank 0\]", out, re.M) and re.search(r"^1: \[rank 1\]", out, re.M), out
    assert '"world_size": 2' in out and '"data_parallel": 2' in out, out
    assert read_status(run_dir)["state"] == "finished"
    assert latest_tag(run_dir) == "step_00000006"
    losses = step_losses(run_dir)
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1], losses
    traces = plan_traces(run_dir)
    assert sorted(traces) == [0, 1] and traces[0] == traces[1] and len(traces[0]) == 6


def test_preemption_signal_checkpoints_and_requeued_job_resumes(cluster, dataset, tmp_path):
    """The pre-timeout path: SIGUSR1 to the batch shell (what --signal=B:USR1@N delivers; sent here with
    `scancel --batch` instead of waiting for a time limit) -> every rank checkpoints and exits 0 -> the script
    requeues the job -> the same job runs again and `--resume auto` continues from that checkpoint to the end."""
    steps = 50  # ~0.15 s each: the signal (sent at step 2+) lands well inside the run
    run_dir = tmp_path / "run"
    env = {**job_env(), "MEGAKV_RUN_DIR": str(run_dir)}  # the run directory as the README's resume recipe sets it
    job = cluster.sbatch(
        PRETRAIN, str(TINY_RECIPE), f"data.datasets=[{dataset}]", f"train.steps={steps}",
        options=["--nodes=2"], env=env, cwd=tmp_path,
    )
    wait_for(lambda: re.search(rf"step [2-9]/{steps} ", job_output(tmp_path, job)), 120, "training to start")
    cluster.signal(job, "USR1", batch=True)
    records = cluster.wait(job, timeout=150)  # releases the requeued job at once (no 120 s BeginTime wait)
    out = job_output(tmp_path, job)
    assert_completed(cluster, job, records, out)
    assert records[0]["Restarts"] == "1", records

    stopped = re.search(r"stop requested \(SIGUSR1\): saving a checkpoint at step (\d+)", out)
    assert stopped, out
    stop_step = int(stopped.group(1))
    assert 0 < stop_step < steps
    first, second = out.split("restart 1:", 1)
    assert "requeueing job" in first and "SIGUSR1" in first
    assert re.search(rf"resumed from \S*step_{stop_step:08d} at step {stop_step} ", second), second
    # The first run trained 1..K, the requeued one K+1..end: no step trained twice, none skipped.
    assert [int(n) for n in re.findall(rf"step (\d+)/{steps} ", first)] == list(range(1, stop_step + 1))
    assert [int(n) for n in re.findall(rf"step (\d+)/{steps} ", second)] == list(range(stop_step + 1, steps + 1))
    assert read_status(run_dir)["state"] == "finished"
    assert latest_tag(run_dir) == f"step_{steps:08d}"
    assert sorted(step_losses(run_dir)) == list(range(1, steps + 1))
    # SLURM's own record: the job ended twice, first requeued, then completed.
    ends = [c for c in cluster.completions() if c.get("JobId") == str(job)]
    assert [c["JobState"] for c in ends][-1] == "COMPLETED" and len(ends) == 2, ends


def test_pipeline_stage_per_node_preempted_and_resumed_equals_one_process(cluster, dataset, tmp_path):
    """parallel.pipeline=2 on 2 nodes x 1 rank: stage 0 on node 1, stage 1 on node 2, so the hidden state and the
    routed K/V cross nodes every micro-batch. SIGUSR1 -> checkpoint -> requeue -> resume, and the losses of the
    whole run equal one process training the same config straight through (the layout is taken from the config;
    pretrain.sbatch is unchanged)."""
    steps = 30
    common = [f"data.datasets=[{dataset}]", f"train.steps={steps}", "parallel.zero_stage=1",
              "routing.per_micro_batch=true", "routing.q_cross=0.75", "train.debug.check_plans=true"]
    reference = launch_train([*common, f"train.run_dir={tmp_path / 'single'}"], nproc=1)
    assert reference.ok, reference.output[-4000:]
    run_dir = tmp_path / "pp2"
    env = {**job_env(), "MEGAKV_RUN_DIR": str(run_dir)}
    job = cluster.sbatch(PRETRAIN, str(TINY_RECIPE), *common, "parallel.pipeline=2",
                         options=["--nodes=2"], env=env, cwd=tmp_path)
    wait_for(lambda: re.search(rf"step [2-9]/{steps} ", job_output(tmp_path, job)), 150, "training to start")
    cluster.signal(job, "USR1", batch=True)
    records = cluster.wait(job, timeout=240)
    out = job_output(tmp_path, job)
    assert_completed(cluster, job, records, out)
    assert records[0]["Restarts"] == "1" and records[0]["NodeList"] == "node[1-2]", records
    assert '"pipeline": 2' in out and '"data_parallel": 1' in out, out
    # Ranks are stages here (rank = stage with data-parallel size 1): rank 0 logs from node task 0, rank 1 from 1.
    assert re.search(r"^0: \[rank 0\]", out, re.M) and re.search(r"^1: \[rank 1\]", out, re.M), out
    stopped = re.search(r"stop requested \(SIGUSR1\): saving a checkpoint at step (\d+)", out)
    assert stopped and 0 < int(stopped.group(1)) < steps, out
    assert read_status(run_dir)["state"] == "finished"
    ours, theirs = step_losses(run_dir), step_losses(tmp_path / "single")
    assert sorted(ours) == sorted(theirs) == list(range(1, steps + 1))
    for step in theirs:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-6), (step, ours[step], theirs[step])


def test_tensor_parallel_inside_each_node_data_parallel_across_nodes_equals_one_process(cluster, dataset, tmp_path):
    """parallel.tensor=2 on 2 nodes x 2 ranks (GPUS_PER_NODE=2): pretrain.sbatch takes the layout from the config,
    torchrun numbers ranks node by node and megakv orders them tensor fastest, so each tensor pair (two all-reduces
    per block each way) is the two ranks of one node and only the data-parallel reduction crosses nodes. With one
    routing plan per micro-batch (the data-parallel ranks train different plans in one step), the losses equal one
    process training the same config, step by step."""
    steps = 8
    common = [f"data.datasets=[{dataset}]", f"train.steps={steps}", "parallel.zero_stage=2",
              "routing.per_micro_batch=true", "routing.q_cross=0.75", "train.debug.check_plans=true"]
    reference = launch_train([*common, f"train.run_dir={tmp_path / 'single'}"], nproc=1)
    assert reference.ok, reference.output[-4000:]
    run_dir = tmp_path / "tp2_dp2"
    job = cluster.sbatch(PRETRAIN, str(TINY_RECIPE), *common, "parallel.tensor=2", f"train.run_dir={run_dir}",
                         "logging.other_ranks_console=info", options=["--nodes=2"],
                         env={**job_env(), "GPUS_PER_NODE": "2"}, cwd=tmp_path)
    records = cluster.wait(job, timeout=240)
    out = job_output(tmp_path, job)
    assert_completed(cluster, job, records, out)
    assert records[0]["NodeList"] == "node[1-2]", records
    assert '"world_size": 4' in out and '"tensor": 2' in out and '"data_parallel": 2' in out, out
    # srun --label gives the node task each rank logged from: ranks 0, 1 (tensor group 0) on node task 0, ranks 2, 3
    # (tensor group 1) on node task 1; the data-parallel pairs (0, 2) and (1, 3) span the nodes.
    node_of = {int(r): int(n) for n, r in re.findall(r"^(\d+): \[rank (\d+)\]", out, re.M)}
    assert node_of == {0: 0, 1: 0, 2: 1, 3: 1}, node_of
    assert read_status(run_dir)["state"] == "finished"
    ours, theirs = step_losses(run_dir), step_losses(tmp_path / "single")
    assert sorted(ours) == sorted(theirs) == list(range(1, steps + 1))
    for step in theirs:
        assert ours[step] == pytest.approx(theirs[step], rel=1e-6), (step, ours[step], theirs[step])
    traces = plan_traces(run_dir)
    assert sorted(traces) == [0, 1, 2, 3] and all(t == traces[0] for t in traces.values()), traces


def test_preprocess_array_and_merge_equal_single_process(cluster, dataset, tmp_path):
    """data_prep/preprocess_array.sbatch as a 4-task array over 6 input files (a contiguous, byte-balanced share
    each), then data_prep/merge.sbatch after it (afterok): the merged pair is byte-identical to one megakv-prep over
    all the files. The scripts' #SBATCH sizes (8 CPUs, 16G) are for real nodes; like a user on a small partition,
    the test overrides them on the command line."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for i, docs in enumerate((30, 5, 60, 12, 45, 20)):  # uneven sizes: shares differ in file count
        lines = [json.dumps({"text": t, "id": f"{i}-{j}"}) for j, t in enumerate(synthetic_text(docs, seed=100 + i))]
        (raw / f"shard_{i}.jsonl").write_text("\n".join(lines) + "\n")
    tokenizer = dataset.parent / "tokenizer"
    out_dir = tmp_path / "prepared"
    env = {**job_env(), "INPUT": f"{raw}/*.jsonl", "TOKENIZER": str(tokenizer), "OUTPUT_DIR": str(out_dir),
           "PREP_ARGS": "--no-progress", "NUM_SHARDS": "4"}
    small = ["--cpus-per-task=1", "--mem=500M", "--time=10"]
    array = cluster.sbatch(PREP_ARRAY, options=["--array=0-3", *small], env=env, cwd=tmp_path)
    merge = cluster.sbatch(PREP_MERGE, options=[f"--dependency=afterok:{array}", *small], env=env, cwd=tmp_path)

    def outputs() -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')}" for f in sorted(tmp_path.glob("*.out")))

    tasks = cluster.wait(array, timeout=120)
    assert len(tasks) == 4 and all(t["JobState"] == "COMPLETED" for t in tasks), (tasks, outputs())
    merged = cluster.wait(merge, timeout=60)
    assert merged[0]["JobState"] == "COMPLETED", (merged, outputs())
    assert sorted(p.name for p in out_dir.glob("part_*.bin")) == [f"part_{i:05d}.bin" for i in range(4)]
    # A task resubmitted alone (as after a node failure) prepares its own share again, not all the files as
    # shard 0 of a 1-task array (which duplicated data in the merge).
    lost = out_dir / "part_00002"
    kept = {suffix: lost.with_suffix(suffix).read_bytes() for suffix in (".bin", ".idx")}
    for suffix in (".bin", ".idx", ".meta.json"):
        lost.with_suffix(suffix).unlink()
    for merged_file in out_dir.glob("train.*"):
        merged_file.unlink()
    again = cluster.sbatch(PREP_ARRAY, options=["--array=2", *small], env=env, cwd=tmp_path)
    assert cluster.wait(again, timeout=120)[0]["JobState"] == "COMPLETED", outputs()
    assert {suffix: lost.with_suffix(suffix).read_bytes() for suffix in (".bin", ".idx")} == kept
    merge = cluster.sbatch(PREP_MERGE, options=small, env=env, cwd=tmp_path)
    assert cluster.wait(merge, timeout=60)[0]["JobState"] == "COMPLETED", outputs()

    reference = tmp_path / "single" / "train"
    single = subprocess.run(
        [str(Path(sys.executable).parent / "megakv-prep"), "--input", f"{raw}/*.jsonl", "--tokenizer", str(tokenizer),
         "--output-prefix", str(reference), "--no-progress"],
        capture_output=True, text=True, env={**os.environ, **job_env()},
    )
    assert single.returncode == 0, single.stdout + single.stderr
    for suffix in (".bin", ".idx"):
        got, want = (out_dir / "train").with_suffix(suffix), reference.with_suffix(suffix)
        assert got.read_bytes() == want.read_bytes(), f"{got} differs from the single-process {want}"


def wait_for(predicate, timeout: float, what: str, poll: float = 0.3):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
