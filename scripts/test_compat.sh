#!/usr/bin/env bash
# Maintainer check: run the transformers-facing tests with the lowest and with the newest versions that
# pyproject.toml allows for transformers, tokenizers and deepspeed, each in a throw-away venv.
#   bash scripts/test_compat.sh            # both
#   bash scripts/test_compat.sh lowest     # or: newest
# Everything else resolves freely (no lock), so this also shows what a library user of megakv gets.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TESTS=(tests/test_hf_modeling.py tests/test_hf_parity.py tests/test_hf_tokenizer.py tests/test_train_finetune.py
       tests/test_data_preprocess.py)
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu
status=0
for which in "${@:-lowest newest}"; do
  for mode in $which; do
    venv=$(mktemp -d "${TMPDIR:-/tmp}/megakv-compat-$mode.XXXXXX")
    trap 'rm -rf "$venv"' EXIT
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet "torch==2.13.0"
    "$venv/bin/python" -m pip install --quiet "tomli; python_version < '3.11'"  # compat_pins.py on 3.10
    "$venv/bin/python" scripts/compat_pins.py "$mode" > "$venv/pins.txt"
    "$venv/bin/python" -m pip install --quiet -r "$venv/pins.txt" -e ".[dev]"
    echo "== $mode: $("$venv/bin/python" -m pip list --format=freeze 2>/dev/null \
         | grep -iE '^(transformers|tokenizers|deepspeed|huggingface.hub|torch)==' | tr '\n' ' ')"
    if "$venv/bin/python" -m pytest -q -p no:cacheprovider "${TESTS[@]}"; then
      echo "== $mode: passed"
    else
      echo "== $mode: FAILED"; status=1
    fi
    rm -rf "$venv"; trap - EXIT
  done
done
exit $status
