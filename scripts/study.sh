#!/usr/bin/env bash
# The paper in miniature, regenerated: set-up (scripts/setup.sh, then the study's pinned optional
# dependencies, scripts/study_setup.sh), then `megakv-study` with any arguments given here (default: all
# parts at scale cpu), caching models under runs/study and writing the report to benchmarks/study_report/.
#   bash scripts/study.sh                      # all three parts (an interrupted run resumes where it stopped)
#   bash scripts/study.sh pretrain ablation    # only the from-scratch parts (no pretrained model needed)
#   bash scripts/study.sh --scale gpu          # the settings for a real run, on a GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The fine-tune part at scale cpu or gpu needs the pretrained model (study_setup.sh); the others do not.
parts=() scale=cpu previous=""
for arg in "$@"; do
    case "$previous" in --scale) scale=$arg ;; --out|--report-dir) ;; *)
        case "$arg" in --scale=*) scale=${arg#--scale=} ;; -*) ;; *) parts+=("$arg") ;; esac ;; esac
    previous=$arg
done
if [ "$scale" != tiny ] && { [ ${#parts[@]} -eq 0 ] || [[ " ${parts[*]} " =~ \ (finetune|all)\  ]]; }; then
    bash scripts/study_setup.sh
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
exec .venv/bin/megakv-study --out runs/study --report-dir benchmarks/study_report "$@"
