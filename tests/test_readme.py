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
