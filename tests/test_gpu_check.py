"""The GPU node check (`python -m megakv.testing.gpu_check`) run here with the CPU standing in for the GPU.

There is no GPU on this machine or in CI: cpu-against-cpu comparisons are equal by construction, so this test
checks the plumbing (every training, resume, export, evaluation and generation step runs and is compared, the
report and the exit status), not the GPU numbers; those come from running the module on a GPU node."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megakv.testing import gpu_check


@pytest.mark.slow
def test_gpu_check_runs_every_comparison_with_the_cpu_standing_in(tmp_path):
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "megakv.testing.gpu_check", "--workdir", str(tmp_path / "work"),
                           "--device", "cpu", "--quick", "--json", str(report)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(report.read_text())
    names = [c["name"] for c in result["checks"]]
    assert len(names) == 13 and all(c["passed"] for c in result["checks"]), result["checks"]
    assert "train cpu bf16 ~ cpu fp32" in names and "transformers generate() = megakv engine on cpu" in names
    assert "13 of 13 checks passed" in proc.stdout
    # The resumed runs really stopped and went on: 8 steps each, the stopped one after step 4.
    stop = next(c for c in result["checks"] if c["name"] == "SIGTERM stop")
    assert stop["measured"] == "stopped after step 4"
    cache = {plan: f["cache_gib"] for plan, f in result["decode"].items()}
    assert cache["every:2"] == pytest.approx(cache["every:1"] / 2) and cache["every:4"] == pytest.approx(
        cache["every:1"] / 4)


def test_gpu_check_refuses_a_missing_gpu_and_a_used_workdir(tmp_path, capsys):
    if not torch.cuda.is_available():
        assert gpu_check.main(["--workdir", str(tmp_path / "w"), "--device", "cuda"]) == 2
        assert "sees no GPU" in capsys.readouterr().err
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    assert gpu_check.main(["--workdir", str(tmp_path / "used"), "--device", "cpu"]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"


def test_a_failed_comparison_fails_the_check():
    reference = {1: 2.0, 2: 1.5}
    assert gpu_check.compare("same", {1: 2.0, 2: 1.5}, reference, 1e-6).passed
    assert not gpu_check.compare("drifted", {1: 2.0, 2: 1.6}, reference, 1e-2).passed
    assert not gpu_check.compare("missing step", {1: 2.0}, reference, 1.0).passed
