#!/usr/bin/env bash
# What this repo owes a GPU, in one command, since device time is scarce (30 minutes a session):
#   1. the kernel tests run natively: bf16, and every autotune candidate of the weight gradient;
#   2. the kernel benchmark at the target shape (K2 layer, E 64, 16k tokens);
#   3. the optimizer-step benchmark (k2-2b: Muon's Newton-Schulz and QK-clip's re-measure);
#   4. unless "quick": the full kernel grid.
# Each step's log and JSON go to $OUT when it is set (the device tool's folder), else
# benchmarks/gpu-run/. Eight files at most, which is what that tool brings back.
# Usage: bash benchmarks/gpu_session.sh [quick]
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/gpu-run}
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {
    local name=$1 t0=$SECONDS
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
# Tests first: the autotuner times candidates but never checks their results. Each candidate is
# compiled for each test shape, so the compiles are spread over processes where pytest-xdist is.
parallel=$(python -c "import xdist" 2>/dev/null && echo "-n 8")
step kernel_tests python -m pytest -q -p no:cacheprovider $parallel tests/test_kernels_gemm.py tests/test_kernels_ffn.py
step kernels_target python -m kernels.bench --quick --out "$out/kernels-target.json"
step optim python -m optim.bench --experts 8 --out "$out/optim-gpu.json"
if [ "${1:-}" != quick ]; then
    step kernels_grid python -m kernels.bench --out "$out/kernels-grid.json"
fi
