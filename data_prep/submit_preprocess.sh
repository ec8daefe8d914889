#!/usr/bin/env bash
# Submit preprocess_array.sbatch as an array of N tasks (default 16) and merge.sbatch to run after it.
# INPUT, TOKENIZER and OUTPUT_DIR (and optionally PREP_ARGS, MERGED_NAME, MEGAKV_VENV) must be exported.
# Extra sbatch options for both jobs (partition, account, --cpus-per-task, --mem, ...) go after N:
#   bash data_prep/submit_preprocess.sh 64 --partition=cpu --cpus-per-task=4 --mem=8G
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
tasks=${1:-16}
shift || true
: "${INPUT:?export INPUT}" "${TOKENIZER:?export TOKENIZER}" "${OUTPUT_DIR:?export OUTPUT_DIR}"
export NUM_SHARDS=$tasks  # every task, and any task resubmitted later, is one share of this many
array=$(sbatch --parsable --array=0-$((tasks - 1)) "$@" "$here/preprocess_array.sbatch")
# --kill-on-invalid-dep: if a task fails, the merge is cancelled instead of pending forever (resubmit the task, then
# the merge: see data_prep/README.md).
merge=$(sbatch --parsable --dependency=afterok:"${array%%;*}" --kill-on-invalid-dep=yes "$@" "$here/merge.sbatch")
echo "array job ${array%%;*} ($tasks tasks), then merge job ${merge%%;*} -> $OUTPUT_DIR/${MERGED_NAME:-train}"
