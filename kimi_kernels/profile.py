"""One forward+backward of the expert FFN for Nsight Compute to profile, the tuned kernels only.

    ncu --profile-from-start off --section SpeedOfLight --section WarpStateStats ... \\
        python -m kimi_kernels.profile [-T 16384 -K 8 -E 64 -D 7168 -F 2048]

A script for a GPU, not a test. It runs a few warm-up passes first, so that the autotuner's trial
launches (every candidate of every kernel) are over, then brackets exactly one forward+backward
with cudaProfilerStart/Stop: with `--profile-from-start off`, ncu sees each tuned kernel of the
layer once. `bash benchmarks/gpu_session.sh profile` runs it with the sections that say where a
kernel's time goes (throughput against the ceilings, occupancy, warp stall reasons).
"""

import argparse

import torch

from kimi_kernels.bench import make_inputs
from kimi_kernels.compile_report import TARGET_SHAPE
from kimi_kernels.experts.triton_ffn import expert_ffn_triton


def forward_backward(x, ids, w, gate_up, down, dy):
    y = expert_ffn_triton(x, ids, w, gate_up, down)
    torch.autograd.grad(y, (x, w, gate_up, down), dy)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for dim, value in TARGET_SHAPE.items():
        ap.add_argument(f"-{dim}", type=int, default=value)
    ap.add_argument("--routing", default="balanced")
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kimi_kernels.profile needs a CUDA GPU")
    inputs = make_inputs(args.T, args.K, args.E, args.D, args.F, args.routing)
    dy = torch.randn_like(inputs[0])
    for _ in range(args.warmup):
        forward_backward(*inputs, dy)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    forward_backward(*inputs, dy)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"profiled one forward+backward at T={args.T} K={args.K} E={args.E} D={args.D} F={args.F}, "
          f"{args.routing} routing")


if __name__ == "__main__":
    main()
