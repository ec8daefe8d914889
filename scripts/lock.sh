#!/usr/bin/env bash
# Refresh requirements/lock.txt: the exact versions of every package (transitive ones included) that
# scripts/setup.sh installs. Resolves pyproject.toml's ranges afresh in a throw-away venv, so run it when you
# mean to move to newer dependencies, then run `bash .ci/run` and commit the lock with the result.
#   bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
venv=$(mktemp -d "${TMPDIR:-/tmp}/megakv-lock.XXXXXX")
trap 'rm -rf "$venv"' EXIT
"$PYTHON" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet "torch==2.13.0"
"$venv/bin/python" -m pip install --quiet ".[dev]"
mkdir -p requirements
{
  echo "# Exact versions installed by scripts/setup.sh (pip constraints). Made by: bash scripts/lock.sh"
  echo "# on $(date -u +%Y-%m-%d) with $("$venv/bin/python" --version). torch is installed first, explicitly;"
  echo "# its pin carries no local tag so the CPU (+cpu) and CUDA builds of 2.13.0 both satisfy it."
  "$venv/bin/python" -m pip list --format=freeze --exclude-editable \
    | grep -viE '^(megakv|pip|setuptools|wheel)==' \
    | sed -E 's/^torch==([0-9.]+)\+.*/torch==\1/' | LC_ALL=C sort -f
} > requirements/lock.txt.tmp
mv requirements/lock.txt.tmp requirements/lock.txt
echo "wrote requirements/lock.txt ($(grep -vc '^#' requirements/lock.txt) packages)"
