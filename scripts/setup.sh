#!/usr/bin/env bash
# Creates .venv (if missing) and installs megakv into it. Idempotent; safe to run before every command.
# torch is installed first and explicitly: torch==2.13.0 resolves to the CPU wheel on CPU-only machines
# that ship it, and to the CUDA build on GPU machines; any other torch spec may pull a multi-GB CUDA wheel.
# Every other package is installed at the exact version in requirements/lock.txt (a pip constraints file
# made by scripts/lock.sh), so this works the same on any day, whatever PyPI released since.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
stamp=.venv/.megakv-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements/lock.txt -nt "$stamp" ]; then
    $PIP install --quiet "torch==2.13.0"
    $PIP install --quiet -c requirements/lock.txt -e ".[dev]"
    touch "$stamp"
fi
