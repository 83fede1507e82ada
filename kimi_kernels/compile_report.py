"""What the compiler makes of our kernels on a GPU we do not have: `python -m kimi_kernels.compile_report`.

A script, not a test (though a test runs it). It traces one forward+backward of the Triton expert
FFN on meta tensors at a chosen shape (default: the benchmark's target shape), which records every
kernel launch with its real arguments, then compiles each launch for every autotune candidate the
autotuner would try there, for a CUDA target (default sm_90, the H100/H200), and reads off the
compiler's own output:

  regs      registers per thread (255 is the ceiling)
  spill     bytes of per-thread stack; our kernels call nothing, so every byte is a register spill
  smem      shared memory per program
  buffers   shared-memory buffers per pipelined operand tile: the real pipeline depth, which the
            compiler may set below num_stages (it does for loads whose address comes from another
            load in the same loop, as in the weight-gradient kernel's gathered rows)
  tma       tile copies issued through TMA (tensor descriptors) rather than per-thread pointers

It does the same for the RMSNorm kernels (`kimi_kernels.norm.rms_norm_triton`; the JSON's "norm") and for
the causal flash attention (`kimi_kernels.attention.flash_attention`: forward, dQ, dK/dV) at K2's MLA head
dims; those rows go to the JSON's "attention" list, beside the FFN's "results".

No GPU is needed: Triton ships ptxas and cuobjdump. So a kernel author on a laptop can see a spill
or a shallow pipeline before a device is lent, and a GPU session can spend its time on timings.
The figures belong to the installed Triton; the JSON records its version.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import tempfile
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kimi_kernels.attention import flash_attention as attention_mod
from kimi_kernels.bench import _tuners as bench_tuners
from kimi_kernels.experts import combine as combine_mod
from kimi_kernels.experts import grouped_gemm
from kimi_kernels.experts.triton_ffn import expert_ffn_triton
from kimi_kernels.norm import rms_norm_triton as norm_mod
from kimi_kernels.tiles import interpreting

TARGET_SHAPE = dict(T=16384, K=8, E=64, D=7168, F=2048)  # kimi_kernels.bench's QUICK shape
# MLA at K2's head dims (Q = N + R = 128 + 64, V = 128), 16 heads: one of benchmarks/attention_bench.py's shapes.
ATTENTION_SHAPE = dict(B=1, H=16, T=4096, Q=192, V=128)

# Which autotuned (or plain) kernel object each launch goes through, by the benchmark's names.
KERNELS = dict(bench_tuners(), combine=combine_mod._combine)
NORM_SHAPE = dict(N=8192, D=7168)  # K2's hidden size, one 8192-token micro-batch
NORM_KERNELS = dict(rms_fwd=norm_mod._rms_fwd, rms_bwd=norm_mod._rms_bwd)
ATTENTION_KERNELS = dict(attn_fwd=attention_mod._fwd_tuned, attn_dq=attention_mod._dq_tuned,
                         attn_dkdv=attention_mod._dkdv_tuned)
MODES = {int(grouped_gemm.SWIGLU_FWD): "gate_up_swiglu", int(grouped_gemm.SWIGLU_BWD): "swiglu_bwd"}


@contextlib.contextmanager
def _recording(kernels):
    """Inside, a launch of any of `kernels` ({name: kernel object}) appends (name, args, kwargs) to
    the yielded list instead of running: `run` is replaced on each kernel object. With meta tensors,
    which carry shapes and strides but no data, nothing runs at all."""
    if interpreting():
        raise SystemExit("kimi_kernels.compile_report compiles for a GPU; unset TRITON_INTERPRET")
    launches = []
    with contextlib.ExitStack() as stack:
        for name, kernel in kernels.items():
            def record(*args, grid=None, warmup=False, _name=name, **kwargs):
                launches.append((_name, args, kwargs))
            stack.enter_context(mock.patch.object(kernel, "run", record))
        yield launches


def trace_launches(T, K, E, D, F, dtype=torch.bfloat16):
    """Every kernel launch of one expert-FFN forward+backward, as (kernel name, args, kwargs), in launch order."""
    with _recording(KERNELS) as launches:
        meta = dict(device="meta", dtype=dtype)
        ids = torch.empty(T, K, device="meta", dtype=torch.int64)  # routing is built on meta tensors too
        x = torch.empty(T, D, **meta, requires_grad=True)
        w = torch.empty(T, K, **meta, requires_grad=True)
        gate_up = torch.empty(E, 2 * F, D, **meta, requires_grad=True)
        down = torch.empty(E, D, F, **meta, requires_grad=True)
        y = expert_ffn_triton(x, ids, w, gate_up, down)
        torch.autograd.grad(y, (x, w, gate_up, down), torch.empty_like(y))
    return launches


def trace_attention_launches(B, H, T, Q, V, dtype=torch.bfloat16):
    """The three launches of one causal flash-attention forward+backward (forward, dQ, dK/dV)."""
    with _recording(ATTENTION_KERNELS) as launches:
        q, k = (torch.empty(B, H, T, Q, device="meta", dtype=dtype, requires_grad=True) for _ in range(2))
        v = torch.empty(B, H, T, V, device="meta", dtype=dtype, requires_grad=True)
        out, _ = attention_mod.flash_attention(q, k, v, Q ** -0.5)
        torch.autograd.grad(out, (q, k, v), torch.empty_like(out))
    return launches


def trace_norm_launches(N, D, dtype=torch.bfloat16):
    """The two launches of one RMSNorm forward+backward, bf16 activations and an fp32 weight (autocast)."""
    with _recording(NORM_KERNELS) as launches:
        x = torch.empty(N, D, device="meta", dtype=dtype, requires_grad=True)
        w = torch.empty(D, device="meta", dtype=torch.float32, requires_grad=True)
        y = norm_mod.rms_norm_triton(x, w, 1e-6)
        torch.autograd.grad(y, (x, w), torch.empty_like(y))
    return launches


def _signature(jit_fn, named):
    """Triton's launch-time specialisation, redone by hand: pointers are 16-byte aligned (true of
    every fresh allocation; meta tensors have no address), integers equal to 1 become constants,
    integers divisible by 16 carry that hint, and constexpr arguments stay constants."""
    sig, attrs, consts = {}, {}, {}
    for i, arg in enumerate(jit_fn.arg_names):
        v = named[arg]
        if i in jit_fn.constexprs:
            sig[arg], consts[arg] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[arg] = "*" + {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                              torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64"}[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[arg] = "i1"
        elif isinstance(v, float):  # never specialised, whatever the value
            sig[arg] = "fp32"
        elif v == 1:
            sig[arg], consts[arg] = "constexpr", 1
        else:
            sig[arg] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs, consts


def _candidates(kernel, args, kwargs):
    """(config kwargs, num_warps, num_stages) the launch would try: for an autotuned kernel, what
    the autotuner's own pruning leaves (run through Triton's code, so a pruning rule that fails on a
    GPU fails here too)."""
    if isinstance(kernel, triton.runtime.Autotuner):
        kernel.nargs = dict(zip(kernel.arg_names, args))
        try:
            configs = kernel.prune_configs(dict(kwargs))
        finally:
            kernel.nargs = None
        return [(dict(c.kwargs), c.num_warps, c.num_stages) for c in configs]
    return [({}, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))]


def _jit_and_heuristics(kernel):
    fn, heuristics = kernel, {}
    while not isinstance(fn, triton.runtime.JITFunction):
        heuristics.update(getattr(fn, "values", {}))
        fn = fn.fn
    return fn, heuristics


_BIN = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")
_ALLOC = re.compile(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x")


def compile_one(kernel, named, cfg, warps, stages, arch):
    jit_fn, heuristics = _jit_and_heuristics(kernel)
    named = dict(named, **cfg)
    for arg, rule in heuristics.items():
        named[arg] = rule(named)
    sig, attrs, consts = _signature(jit_fn, named)
    compiled = triton.compile(ASTSource(jit_fn, sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=dict(num_warps=warps, num_stages=stages))
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(_BIN, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    ttgir = compiled.asm["ttgir"]
    return dict(regs=int(regs), spill=int(stack), smem=compiled.metadata.shared,
                buffers=sorted(int(n) for n in _ALLOC.findall(ttgir)),
                tma=ttgir.count("async_tma_copy_global_to_local"))


def _launch_name(kernel_name, named):
    """The launch's job in the FFN: the scatter GEMM is the down projection when gate-weighted
    (forward) and dX otherwise; the weight gradient gathers dy for down and x for gate_up."""
    if kernel_name.startswith("expert_gemm"):
        mode = int(named["MODE"])
        if mode == int(grouped_gemm.SCATTER):
            return "down" if named["SCALE"] else "dx"
        return MODES[mode]
    if kernel_name == "expert_wgrad":
        return "wgrad_down" if named["L_GATHER"] else "wgrad_gate_up"
    return kernel_name


def report(T, K, E, D, F, arch=90, only=""):
    return _compile_launches(trace_launches(T, K, E, D, F), KERNELS, arch, only)


def attention_report(B, H, T, Q, V, arch=90, only=""):
    return _compile_launches(trace_attention_launches(B, H, T, Q, V), ATTENTION_KERNELS, arch, only)


def norm_report(N, D, arch=90, only=""):
    return _compile_launches(trace_norm_launches(N, D), NORM_KERNELS, arch, only)


def _compile_launches(launches, kernels, arch, only):
    rows, seen = [], set()
    for kernel_name, args, kwargs in launches:
        kernel = kernels[kernel_name]
        jit_fn, _ = _jit_and_heuristics(kernel)
        named = dict(zip(jit_fn.arg_names, args), **kwargs)
        launch = _launch_name(kernel_name, named)
        if launch in seen or not any(name in launch for name in only.split(",")):  # combine runs twice
            continue
        seen.add(launch)
        for cfg, warps, stages in _candidates(kernel, args, kwargs):
            row = dict(launch=launch, config=dict(cfg, num_warps=warps, num_stages=stages),
                       **compile_one(kernel, named, cfg, warps, stages, arch))
            rows.append(row)
            print(_fmt(row), flush=True)
    return rows


def _fmt(row):
    short = {"TOKENS_AHEAD": "ahead", "SORTED_TMA": "tma", "num_warps": "warps", "num_stages": "stages"}
    cfg = " ".join(f"{short.get(k, k)}={int(v) if isinstance(v, bool) else v}" for k, v in row["config"].items()
                   if k != "GROUP_M")
    flag = "  <- spills" if row["spill"] else ""
    return (f"{row['launch']:15s} {cfg:52s} regs {row['regs']:3d} spill {row['spill']:5d} B "
            f"smem {row['smem'] // 1024:3d} KiB buffers {row['buffers']} TMA copies {row['tma']}{flag}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for dim, value in TARGET_SHAPE.items():
        ap.add_argument(f"-{dim}", type=int, default=value)
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90: H100/H200)")
    ap.add_argument("--only", default="",
                    help="launches whose name contains one of these (comma-separated), e.g. swiglu_bwd,wgrad")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/kernels-compile-sm<arch>.json)")
    args = ap.parse_args()
    shape = {dim: getattr(args, dim) for dim in TARGET_SHAPE}
    rows = report(**shape, arch=args.arch, only=args.only)
    attention_rows = attention_report(**ATTENTION_SHAPE, arch=args.arch, only=args.only)
    norm_rows = norm_report(**NORM_SHAPE, arch=args.arch, only=args.only)
    out = args.out or f"benchmarks/kernels-compile-sm{args.arch}.json"
    with open(out, "w") as f:
        json.dump(dict(meta=dict(shape=shape, attention_shape=ATTENTION_SHAPE, norm_shape=NORM_SHAPE, arch=args.arch,
                                 triton=triton.__version__, dtype="bfloat16"),
                       results=rows, attention=attention_rows, norm=norm_rows), f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
