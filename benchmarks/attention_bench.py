"""Benchmark causal attention at K2's MLA head dims: `python benchmarks/attention_bench.py [--out PATH]`.

A script, not a test: prints a table and writes JSON (default benchmarks/attention-<gpu>.json).
For each shape (B = 1, H heads, T tokens, Q = 192 query/key dims, V = 128 value dims, bf16) it
times, forward alone and forward+backward:
  flash           our Triton kernel (`kimi_kernels.attention.flash_attention`), each head's max logit included
  sdpa            F.scaled_dot_product_attention(is_causal=True) as MLA calls it off our kernel,
                  and the same pinned to each backend torch has (flash, efficient, cudnn; one that
                  refuses Q != V or the GPU is recorded with its reason), and torch's flash backend
                  on V zero-padded to Q and sliced back (sdpa_flash_pad_v: how MLA gets FA2 elsewhere)
  sdpa+max        sdpa plus MLA.head_max_logits, the extra Q K^T pass QK-clip costs without our kernel
and the cost of the by-product: `max_host_ms` is the forward's [B, H, T] -> [H] reduction alone
(the in-kernel part, one row max stored per query, is not separable: online softmax keeps that max
anyway), `max_sdpa_ms` what head_max_logits adds to sdpa.
TFLOP/s count the causal half of the matmuls once: forward B*H*T^2*(Q + V), backward
B*H*T^2*(3Q + 2V) (Dao 2023 §3.1's five matmuls), though our backward recomputes Q K^T and dO V^T
once in each of its two kernels.
"""

import argparse
import datetime
import json
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from kimi_kernels.attention import flash_attention as fa  # noqa: E402
from kimi_kernels.bench import cuda_time_ms  # noqa: E402
from moe.attention import MLA  # noqa: E402

Q_DIM, V_DIM = 192, 128  # K2: qk_nope_head_dim + qk_rope_head_dim, v_head_dim
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", default="16,64", help="comma-separated head counts (K2 has 64)")
    ap.add_argument("--seq", default="4096,8192", help="comma-separated sequence lengths")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/attention-<gpu>.json)")
    args = ap.parse_args(argv)
    try:
        args.heads = [int(h) for h in args.heads.split(",")]
        args.seq = [int(t) for t in args.seq.split(",")]
    except ValueError:
        ap.error(f"--heads {args.heads!r} and --seq {args.seq!r} must be comma-separated integers")
    if min(args.heads + args.seq + [args.batch]) < 1:
        ap.error(f"--heads {args.heads}, --seq {args.seq} and --batch {args.batch} must all be >= 1")
    return args


def _sdpa(backend=None):
    def attend(q, k, v, scale):
        if backend is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return attend


def _sdpa_flash_pad_v(q, k, v, scale):
    v_pad = F.pad(v, (0, q.shape[-1] - v.shape[-1]))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = F.scaled_dot_product_attention(q, k, v_pad, is_causal=True, scale=scale)
    return out[..., :v.shape[-1]], None


def _head_max_logits(q, k, scale):
    # head_max_logits reads only num_heads and scale from the module; the real MLA would allocate
    # K2-sized projections for nothing.
    return MLA.head_max_logits(types.SimpleNamespace(num_heads=q.shape[1], scale=scale), q, k)


def implementations():
    """{name: fn(q, k, v, scale) -> (out, max_logit_H or None)}."""
    impls = {"flash": fa.flash_attention, "sdpa": lambda q, k, v, s: (_sdpa()(q, k, v, s), None)}
    for backend in SDPA_BACKENDS:
        impls[f"sdpa_{backend}"] = lambda q, k, v, s, _f=_sdpa(backend): (_f(q, k, v, s), None)
    impls["sdpa_flash_pad_v"] = _sdpa_flash_pad_v
    impls["sdpa+max"] = lambda q, k, v, s: (_sdpa()(q, k, v, s), _head_max_logits(q, k, s))
    return impls


def time_impl(fn, q, k, v, scale, mode):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(q, k, v, scale)
    else:
        dout = torch.randn(q.shape[:3] + (v.shape[-1],), device=q.device, dtype=q.dtype)

        def step():
            out, _ = fn(q, k, v, scale)
            torch.autograd.grad(out, (q, k, v), dout)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = cuda_time_ms(step)
    return ms, (torch.cuda.max_memory_allocated() - base) / 2**20


def check(impls, q, k, v, scale):
    """Our kernel against SDPA and head_max_logits on the benchmark's own data (the autotuner times
    candidates but never checks their results): the largest differences, printed and saved."""
    out, max_H = impls["flash"](q, k, v, scale)
    ref_out, ref_max_H = impls["sdpa+max"](q, k, v, scale)
    return dict(out_max_abs_diff=(out.float() - ref_out.float()).abs().max().item(),
                max_logit_max_abs_diff=(max_H - ref_max_H).abs().max().item(),
                max_logit_max=ref_max_H.max().item())


def bench_shape(B, H, T, impls):
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k = (torch.randn(B, H, T, Q_DIM, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
            for _ in range(2))
    v = torch.randn(B, H, T, V_DIM, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
    scale = Q_DIM ** -0.5
    flops = dict(fwd=B * H * T * T * (Q_DIM + V_DIM), fwd_bwd=B * H * T * T * (4 * Q_DIM + 3 * V_DIM))
    row = dict(B=B, H=H, T=T, Q=Q_DIM, V=V_DIM, check=check(impls, q, k, v, scale), times={})
    for name, fn in impls.items():
        for mode in ("fwd", "fwd_bwd"):
            try:
                ms, mib = time_impl(fn, q, k, v, scale, mode)
            except RuntimeError as e:  # a pinned SDPA backend that does not take this shape or GPU
                row["times"][f"{name}/{mode}"] = dict(unsupported=str(e).splitlines()[0][:200])
                print(f"  {name:16s} {mode:8s} unsupported: {str(e).splitlines()[0][:100]}", flush=True)
                continue
            row["times"][f"{name}/{mode}"] = dict(ms=ms, tflops=flops[mode] / ms / 1e9, peak_mib=mib)
            print(f"  {name:16s} {mode:8s} {ms:8.3f} ms {flops[mode] / ms / 1e9:7.1f} TFLOP/s "
                  f"peak +{mib:7.0f} MiB", flush=True)
    with torch.no_grad():
        _, _, top_BHT = fa.attention_forward(q, k, v, scale)
        row["max_host_ms"] = cuda_time_ms(lambda: top_BHT.amax(dim=(0, 2)))
    t = row["times"]
    row["max_sdpa_ms"] = {mode: t[f"sdpa+max/{mode}"]["ms"] - t[f"sdpa/{mode}"]["ms"] for mode in ("fwd", "fwd_bwd")}
    row["speedup_vs_sdpa_max"] = {mode: t[f"sdpa+max/{mode}"]["ms"] / t[f"flash/{mode}"]["ms"]
                                  for mode in ("fwd", "fwd_bwd")}
    print(f"  check {row['check']}; max by-product host {row['max_host_ms']:.3f} ms; head_max_logits adds "
          f"{row['max_sdpa_ms']['fwd']:.3f} ms; flash vs sdpa+max fwd+bwd x{row['speedup_vs_sdpa_max']['fwd_bwd']:.2f}")
    return row


def tuned_configs():
    tuners = dict(fwd=fa._fwd_tuned, dq=fa._dq_tuned, dkdv=fa._dkdv_tuned)
    return {name: {str(key): str(cfg) for key, cfg in t.cache.items()} for name, t in tuners.items()}


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("attention_bench times CUDA kernels and this machine has no CUDA device; "
                         "correctness on CPU is tests/test_flash_attention.py (Triton interpreter)")

    device = torch.cuda.get_device_name()
    meta = dict(device=device, capability=torch.cuda.get_device_capability(), date=datetime.date.today().isoformat(),
                torch=torch.__version__, triton=triton.__version__, dtype="bfloat16")
    out = args.out or f"benchmarks/attention-{device.replace(' ', '_')}.json"
    impls, rows = implementations(), []
    for H in args.heads:
        for T in args.seq:
            print(f"B={args.batch} H={H} T={T} Q={Q_DIM} V={V_DIM} bf16", flush=True)
            rows.append(bench_shape(args.batch, H, T, impls))
            with open(out, "w") as f:  # after every shape: a session cut short keeps what it measured
                json.dump(dict(meta=meta, results=rows, tuned_configs=tuned_configs()), f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
