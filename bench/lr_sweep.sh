#!/usr/bin/env bash
# Learning-rate sweep behind DEFAULT_LR / DEFAULT_LORA_LR (salf_engine/config.py), on a validation part
# carved from TREC's training split (--eval-split holdout: 500 examples, the same for every run), never
# on the test split. SmolLM2-135M-Instruct, 960 training examples from the rest, one epoch, steps of 8,
# seed 0. Two cells at a time, one thread each; finished cells are skipped (salf compare resumes).
#   bash bench/lr_sweep.sh            # then: bench/results/lr_sweep.md holds the table
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT_DIR:-runs/lr-sweep}
CELLS=(full@2e-5 full@5e-5 full@1e-4 full@2e-4 lora-half@3e-4 lora-half@1e-3 lora-half@3e-3 lora-half@1e-2
       lora-full@1e-3)
run_cell() {
  local s=${1%%@*} lr=${1##*@}
  OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 "$PY" -m salf_engine compare --model smollm2-135m \
    --datasets trec --data-dir ../shared/data --strategies "$s" --eval-split holdout --limit 960 --lr "$lr" \
    --max-length 128 --batch-size 8 --seed 0 --output "$OUT/$s-lr$lr" --no-zero-shot --discard-models --quiet
}
for ((i = 0; i < ${#CELLS[@]}; i += 2)); do
  run_cell "${CELLS[i]}" &
  if ((i + 1 < ${#CELLS[@]})); then run_cell "${CELLS[i + 1]}"; fi
  wait
done
