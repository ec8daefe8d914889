"""Config and model-directory mistakes are one `field = value: problem. Fix: ...` line with exit 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_inference_support import tiny_model, write_indexed_split, write_model_dir

from megakv.cli.eval import main as eval_main
from megakv.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CHILD_ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "PATH": "/usr/bin:/bin"}


def _train_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megakv.cli.train", *args, "--dry-run"], cwd=REPO, env=CHILD_ENV,
                          capture_output=True, text=True, timeout=120)


def _one_clean_line(text: str) -> str:
    assert "Traceback" not in text and text.strip().count("\n") == 0 and "Fix:" in text, text
    return text


def test_a_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layers: 4\n  d_model: [64\n")
    with pytest.raises(ConfigError, match=r"not valid YAML at line 4, column 1: did not find expected ',' or "
                                          r"'\]' \(while parsing a flow sequence at line 3, column 12\)"):
        load_config(bad)
    result = _train_cli(str(bad))
    assert result.returncode == 2
    assert f"'{bad}': not valid YAML at line 4" in _one_clean_line(result.stderr)


def test_a_yaml_file_that_is_not_a_mapping_is_refused(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- model\n- train\n")
    with pytest.raises(ConfigError, match="holds a YAML ListConfig, not a mapping of sections"):
        load_config(bad)


def test_one_path_where_a_list_is_expected_is_a_list_of_one():
    cfg = load_config(None, ["data.datasets=data/a/train", "data.weights=2.0", "data.valid_datasets=data/a/valid"])
    assert (cfg.data.datasets, cfg.data.weights, cfg.data.valid_datasets) == (["data/a/train"], [2.0],
                                                                               ["data/a/valid"])
    assert load_config(None, ["data.datasets=[x,y]"]).data.datasets == ["x", "y"]
    assert load_config(None, ["validation.plans=every:2"]).validation.plans == ["every:2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: train.device=cuda is valid here")
def test_train_device_cuda_without_a_gpu_fails_the_dry_run():
    result = _train_cli(str(REPO / "megakv" / "recipes" / "tiny.yaml"), "train.device=cuda")
    assert result.returncode == 2
    assert "config field 'train.device' = 'cuda': no CUDA GPU is available" in _one_clean_line(result.stderr)


def test_device_accelerator_and_backend_must_agree():
    """Each pair failed only at the first forward or collective: DeepSpeed on another accelerator than the run
    (a CPU run on a GPU node had its engine on the GPU), NCCL on the CPU, gloo on GPUs."""
    tiny = str(REPO / "megakv" / "recipes" / "tiny.yaml")
    env = {**CHILD_ENV, "DS_ACCELERATOR": "cuda"}
    result = subprocess.run([sys.executable, "-m", "megakv.cli.train", tiny, "train.device=cpu", "--dry-run"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "'train.device' = 'cpu': the run would use the cpu while DS_ACCELERATOR=cuda" in _one_clean_line(
        result.stderr)
    result = _train_cli(tiny, "train.device=cpu", "parallel.backend=nccl")
    assert result.returncode == 2
    assert "'parallel.backend' = 'nccl': NCCL runs on GPUs only" in _one_clean_line(result.stderr)


def test_a_cpu_run_pins_deepspeed_to_the_cpu(monkeypatch):
    """DeepSpeed picks CUDA whenever torch sees a GPU, whatever train.device says; a CPU run pins it first."""
    from megakv.config.devices import device_type
    from megakv.parallel.context import pin_deepspeed_to

    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    pin_deepspeed_to("cpu")
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert device_type("auto") == "cpu"  # pinned: auto follows DeepSpeed's accelerator, even on a GPU node
    monkeypatch.setenv("DS_ACCELERATOR", "cuda")
    assert device_type("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    pin_deepspeed_to("cuda")
    assert os.environ["DS_ACCELERATOR"] == "cuda"


@pytest.fixture(scope="module")
def good_model(tmp_path_factory):
    return write_model_dir(tmp_path_factory.mktemp("m"), tiny_model(seed=2))


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    return write_indexed_split(tmp_path_factory.mktemp("data") / "val", n_docs=4, doc_len=20)


def _damaged(good_model, tmp_path, damage) -> str:
    model = tmp_path / "model"
    shutil.copytree(good_model, model)
    damage(model)
    return str(model)


def _truncate(model):
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _corrupt_header(model):
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[12:24] = b"#" * 12
    weights.write_bytes(bytes(data))


def _append(text):
    def damage(model):
        with open(model / "config.yaml", "a") as f:
            f.write(text)
    return damage


def _set(key: str, value: str):
    def damage(model):
        path = model / "config.yaml"
        path.write_text("\n".join(f"{key}: {value}" if line.startswith(f"{key}:") else line
                                  for line in path.read_text().splitlines()) + "\n")
    return damage


@pytest.mark.parametrize("damage,message", [
    (_truncate, "model.safetensors: truncated or corrupt safetensors file"),
    (_corrupt_header, "model.safetensors: truncated or corrupt safetensors file"),
    (_append("n_layers: [\n"), "config.yaml': not valid YAML"),
    (_append("no_such_field: 1\n"), "config field 'model.no_such_field'"),
    (_append("d_model: 32\n"), "config.yaml': not valid YAML"),  # a duplicate key
    (_set("d_model", "wide"), "config field 'model.d_model' = 'wide'"),
    (_set("n_heads", "5"), "config field 'model.n_kv_heads' = 2: n_heads % n_kv_heads != 0"),
    (_set("ffn_hidden", "128"), "model.safetensors: weights do not match the model config (size mismatch"),
], ids=["truncated", "header", "yaml-syntax", "unknown-field", "duplicate-key", "wrong-type", "invalid", "shape"])
def test_a_damaged_model_directory_is_one_clear_error(good_model, split, tmp_path, capsys, damage, message):
    model = _damaged(good_model, tmp_path, damage)
    assert eval_main(["--model", model, "--data", str(split), "--retain", "all", "--no-progress"]) == 2
    err = _one_clean_line(capsys.readouterr().err)
    assert message in err, err


def test_a_layout_that_does_not_fit_says_how_many_processes_to_launch():
    result = _train_cli(str(REPO / "megakv" / "recipes" / "tiny.yaml"), "parallel.tensor=2")
    assert result.returncode == 2
    assert "launch 2 processes or a multiple of 2 (nodes x GPUS_PER_NODE with slurm/pretrain.sbatch" in _one_clean_line(
        result.stderr)


@pytest.mark.slow
def test_a_config_mistake_on_every_rank_is_said_once():
    from train_helpers import launch_train

    for extra in (["--dry-run"], []):  # without --dry-run the ranks also meet on the launcher's store
        launch = launch_train(["parallel.tensor=4", *extra], nproc=2, launcher="torchrun", timeout=120)
        assert not launch.ok
        assert launch.output.count("world size 2 is not a multiple of tensor x pipeline = 4") == 1, launch.output
