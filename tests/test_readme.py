"""Every Python block in README.md runs as written, in a fresh interpreter, against the paths it names."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_inference_support import tiny_model, write_model_dir

from megakv.hf.modeling import export_for_transformers

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 2


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A directory holding what the snippets name: `hf/mine-rcla`, a to-hf-rcla export with a tokenizer."""
    root = tmp_path_factory.mktemp("readme")
    export_for_transformers(write_model_dir(root, tiny_model(seed=1)), root / "hf" / "mine-rcla", retain="every:2")
    return root


@pytest.mark.slow  # each snippet starts an interpreter importing torch + transformers (~5-15 s)
@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs_as_written(workdir, index):
    result = subprocess.run([sys.executable, "-c", SNIPPETS[index]], cwd=workdir, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"README snippet {index} failed:\n{SNIPPETS[index]}\n{result.stderr[-3000:]}"


def _torchrun_commands() -> list[tuple[int, str, list[str]]]:
    """(processes, recipe, overrides) of each README `torchrun ... megakv.cli.train megakv/recipes/X.yaml` line."""
    text = README.read_text().replace("\\\n", " ")
    commands = []
    for line in text.splitlines():
        found = re.search(r"torchrun --nproc_per_node (\d+) -m megakv\.cli\.train (megakv/recipes/\S+\.yaml)(.*)", line)
        if found:
            words = found.group(3).split("#")[0].split()
            commands.append((int(found.group(1)), found.group(2), [w for w in words if "=" in w and w[0] != "-"]))
    return commands


def test_readme_torchrun_commands_pass_the_launch_checks_of_their_layout():
    """The layout commands were refused as written once (demo.yaml's zero2 fragment against zero_stage=1): each
    one's config, layout and generated DeepSpeed config now pass the checks a launch makes before training."""
    from megakv.config import load_config
    from megakv.train.ds_config import build_ds_config, gradient_accumulation_steps
    from megakv.train.preflight import check_pipeline

    commands = _torchrun_commands()
    assert len(commands) >= 4 and any("parallel.pipeline=2" in c[2] for c in commands)
    root = README.parent
    for processes, recipe, overrides in commands:
        cfg = load_config(root / recipe, overrides)
        data_parallel = cfg.parallel.validate_layout(processes)
        check_pipeline(cfg, gradient_accumulation_steps(cfg, data_parallel))
        built = build_ds_config(cfg, data_parallel)
        assert built["zero_optimization"]["stage"] == cfg.parallel.zero_stage, (recipe, overrides)
