#!/usr/bin/env bash
# The GPU check of issue 16, in one script (step limits sum to 8.5 min; expected < 8 on one H200):
#   1. the Triton kernel tests on the GPU (pytest when installed; bench_kernels.py's own
#      comparisons against the torch reference stand in otherwise)
#   2. delta products at decode shapes (Qwen2.5-7B linears, R = 1…64 rows, widths 2–8 in one matrix):
#      triton / torch / cached times against the packed bytes at the measured memory bandwidth,
#      and a sweep of the kernels' tile sizes
#   3. per-matrix compress time at Qwen2.5-7B shapes
#   4. bench_serving.py on a synthetic Qwen2.5-7B-shaped model (2 layers, random weights, PrinMix 1/16
#      deltas of a realistic rank structure) for N = 1, 4, 16, 32: prinmix vs naive vs base
# Needs: torch (CUDA), triton, transformers and `pip install -e .` (no network, no extras).
#   bash benchmarks/device_check.sh            # on the GPU machine
#   bash benchmarks/device_check.sh --smoke    # anywhere: CPU, Triton's interpreter, shapes / 16–32
# Each step has its own time limit; a step that fails or runs out of time is reported and the
# script goes on. Work files: $PRINMIX_DEVICE_DIR (default /tmp/prinmix-device-check).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
SMOKE=""
[ "${1:-}" = "--smoke" ] && SMOKE="--smoke"
WORK="${PRINMIX_DEVICE_DIR:-/tmp/prinmix-device-check}"
mkdir -p "$WORK"
START=$SECONDS

step() {   # step LIMIT_S TITLE COMMAND...
    local limit=$1 title=$2
    shift 2
    echo
    echo "== $title (limit ${limit} s, at $((SECONDS - START)) s)"
    timeout "$limit" "$@"
    local rc=$?
    [ $rc -eq 124 ] && echo "!! $title: out of time after ${limit} s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && echo "!! $title: failed (exit $rc)"
    return 0
}

python - <<'PY'
import torch, transformers
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, triton {tv}, GPU {gpu}")
PY

if python -c "import pytest" 2>/dev/null; then
    step 60 "1. kernel tests" python -m pytest -q tests/runtime/test_triton_kernels.py -x
else
    echo; echo "== 1. kernel tests: pytest is not installed; step 2 compares every backend with the torch reference"
fi

if [ -n "$SMOKE" ]; then
    step 300 "2. delta products at decode shapes" python benchmarks/bench_kernels.py --smoke --sweep --rows 1,3
    step 120 "3. compress time per matrix" python benchmarks/bench_compress_shapes.py --smoke
    step 180 "4a. synthetic Qwen2.5-7B-shaped pair" python benchmarks/synthetic_qwen.py "$WORK/qwen7b-smoke" --smoke
    step 300 "4b. serving, N = 1, 2" python benchmarks/bench_serving.py --base "$WORK/qwen7b-smoke/base" \
        --delta "$WORK/qwen7b-smoke/delta.prinmix" --tenants 1,2 --prefill 16 --decode 4 --repeat 1 \
        --naive-copies 2 --workdir "$WORK/serving-smoke"
else
    step 90 "2. delta products at decode shapes" python benchmarks/bench_kernels.py --sweep
    step 90 "3. compress time per matrix" python benchmarks/bench_compress_shapes.py
    step 120 "4a. synthetic Qwen2.5-7B-shaped pair" python benchmarks/synthetic_qwen.py "$WORK/qwen7b"
    step 150 "4b. serving, N = 1…32" python benchmarks/bench_serving.py --base "$WORK/qwen7b/base" \
        --delta "$WORK/qwen7b/delta.prinmix" --tenants 1,4,16,32 --prefill 128 --decode 32 --repeat 1 \
        --naive-copies 2 --dtype bfloat16 --workdir "$WORK/serving"
fi
echo
echo "device check done in $((SECONDS - START)) s"
