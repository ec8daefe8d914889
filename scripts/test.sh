#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the test suite on CPU. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Offline by design: nothing may reach a model hub at test time; one thread per process (2-core CI).
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
.venv/bin/python -m ruff check megakv tests benchmarks data_prep
.venv/bin/python -m pytest "$@"
