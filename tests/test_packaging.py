"""A non-editable install (a wheel) carries everything the shipped recipes need: the demo recipe's
DeepSpeed fragment, the recipes themselves, and a dry run works from a directory with no checkout."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

RESOLVE = """
import importlib.resources, json, sys
import megakv
from megakv.config import load_config
from megakv.train.ds_config import build_ds_config

assert megakv.__file__.startswith(sys.argv[1]), megakv.__file__  # the wheel's copy, not the checkout
recipe = importlib.resources.files("megakv") / "recipes" / "demo.yaml"
print(json.dumps(build_ds_config(load_config(str(recipe)), data_parallel=2)))
print(recipe)
"""


def test_the_demo_recipe_runs_from_a_wheel(tmp_path):
    source = tmp_path / "src"  # build from a copy: never write build/ or egg-info into the shared checkout
    shutil.copytree(REPO / "megakv", source / "megakv", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                    "--quiet", "-w", str(tmp_path / "dist"), str(source)], check=True, timeout=300)
    (wheel,) = (tmp_path / "dist").glob("megakv-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {"megakv/ds_configs/zero2.json", "megakv/recipes/demo.yaml", "megakv/recipes/tiny.yaml"} <= set(names)
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)

    work = tmp_path / "user"  # a user's directory: no checkout, no ds_configs/ beside it
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(key, None)
    resolved = subprocess.run([sys.executable, "-c", RESOLVE, str(site)], cwd=work, env=env, capture_output=True,
                              text=True, timeout=120)
    assert resolved.returncode == 0, resolved.stderr
    ds_config_text, recipe = resolved.stdout.strip().splitlines()
    ds = json.loads(ds_config_text)
    fragment = json.loads((REPO / "megakv" / "ds_configs" / "zero2.json").read_text())
    assert ds["zero_optimization"] == {**ds["zero_optimization"], **fragment["zero_optimization"]}

    # the demo's own steps, as the README gives them: prepare the data, then check the launch
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", *args], cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)

    data = run("megakv.cli.data", "demo", "--output", "data/shakespeare", "--no-progress")
    assert data.returncode == 0, data.stderr
    dry = run("megakv.cli.train", recipe, "--dry-run")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert json.loads((work / "runs" / "demo" / "ds_config.json").read_text())["zero_optimization"][
        "reduce_bucket_size"] == fragment["zero_optimization"]["reduce_bucket_size"]
