#!/usr/bin/env bash
# What this repo owes a GPU, step by step, since device time is scarce (15 minutes a task, starts
# included, and at most 10 minutes a command on the device tool).
#   tests   the kernel tests, natively: bf16 with every autotune candidate, fp32/fp16 autotuned
#   target  the kernel benchmark at the target shape (K2 layer, E 64, 16k tokens)
#   optim   the optimizer-step benchmark (k2-2b: Muon's Newton-Schulz, QK-clip's re-measure)
#   grid    the kernel benchmark's full grid
#   profile Nsight Compute on one tuned forward+backward at the target shape (where the time goes)
#   decode  decode speed of k2-2b from the compressed cache (benchmarks/decode_bench.py)
#   rl      one RL iteration of small and k2-2b: sampling tokens/s, sampling vs training share
#   bench   launch.bench on k2-2b: step time, MFU, peak memory and stage shares, one switch at a time
#   attention  the flash-attention tests natively (bf16, every tile candidate at Q 192 / V 128), then
#           its benchmark against SDPA at MLA's head dims (benchmarks/attention_bench.py)
# Usage: bash benchmarks/gpu_session.sh [STEP...]   (default: tests target optim)
# Each step's log and JSON go to $OUT when it is set, else to benchmarks/gpu-run/. The device tool
# brings back 8 files of $OUT at most: gpu.txt plus a log and usually a JSON per step, so name at
# most three steps a call (or pack $OUT into one archive at the end).
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
steps=${*:-tests target optim}
for s in $steps; do
    case $s in
        # Tests first: the autotuner times candidates but never checks their results. Each
        # candidate compiles per test shape, so the compiles are spread over processes.
        tests) step kernel_tests python -m pytest -q -p no:cacheprovider \
                   $(python -c "import xdist" 2>/dev/null && echo "-n 8") \
                   tests/test_kernels_gemm.py tests/test_kernels_ffn.py tests/test_kernels_stage_choice.py tests/test_rms_norm.py tests/test_weight_casts.py ;;
        target) step kernels_target python -m kimi_kernels.bench --quick --out "$out/kernels-target.json" ;;
        optim) step optim python -m optim.bench --experts 8 --out "$out/optim-gpu.json" ;;
        grid) step kernels_grid python -m kimi_kernels.bench --out "$out/kernels-grid.json" ;;
        profile) step profile ncu --profile-from-start off --csv --page details --log-file "$out/profile.csv" \
                     --section SpeedOfLight --section Occupancy --section LaunchStats \
                     --section WarpStateStats --section MemoryWorkloadAnalysis \
                     python -m kimi_kernels.profile ;;
        decode) step decode python benchmarks/decode_bench.py --preset k2-2b --out "$out/decode-cuda.json" ;;
        rl) step rl_small python benchmarks/rl_bench.py --preset small --out "$out/rl-small-cuda.json"
            step rl_k2_2b python benchmarks/rl_bench.py --preset k2-2b --prompts 8 --response-tokens 256 \
                --batch-size 64 --micro-groups 1 --out "$out/rl-k2-2b-cuda.json" ;;
        attention) step attention_tests python -m pytest -q -p no:cacheprovider tests/test_flash_attention.py
                   step attention_bench python benchmarks/attention_bench.py --out "$out/attention-cuda.json" ;;
        bench) step bench python -m launch.bench --preset k2-2b --steps 5 --warmup 2 --grad-accum 4 \
                   --variant sdpa:attention=sdpa --variant ce:loss_chunk=4096 --variant muon:optimizer=muon \
                   --variant norm_ref:norm=reference --variant casts_micro:weight_casts=micro \
                   --variant ours_only:expert_stages=triton --variant selective:recompute=selective --variant full:recompute=full \
                   --out "$out/bench-k2-2b-cuda.json" ;;
        *) echo "unknown step '$s' (tests, target, optim, grid, profile, decode, rl, attention, bench)" >&2; exit 2 ;;
    esac
done
