#!/usr/bin/env bash
# `salf train` under torchrun, unchanged: every rank plans the same steps (same cut per micro-batch on every
# rank), trains its share of each micro-batch, gradients are averaged; rank 0 writes the run directory.
# --batch-size is per rank, so a step holds batch-size x grad-accum x ranks examples.
#
#   NPROC=2 bash examples/torchrun.sh                       # 2 GPUs (or 2 CPU processes without CUDA)
#   MODEL=path/to/model DATASET=sst5 bash examples/torchrun.sh --max-steps 100
set -euo pipefail
PYTHON=${PYTHON:-python}
exec "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "${NPROC:-2}" -m salf_engine train \
    --model "${MODEL:-smollm2-135m}" --dataset "${DATASET:-trec}" --strategy salf --budget uniform \
    --batch-size "${BATCH_SIZE:-8}" --output "${OUTPUT:-runs/salf-torchrun}" --overwrite "$@"
