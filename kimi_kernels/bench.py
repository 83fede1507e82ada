"""Benchmark the expert FFN: `python -m kimi_kernels.bench [--quick] [--out benchmarks/kernels-<gpu>.json]`.

A script, not a test: prints a table and writes JSON. For each shape x routing x mode (forward,
forward+backward) it times three implementations of the same maths on bf16 CUDA tensors:
  triton      our kernels (`kimi_kernels.experts.triton_ffn`), every stage on our kernel
  auto        the same with each stage on our kernel or torch._grouped_mm, whichever timed faster
              (`kimi_kernels.experts.stage_choice`, the default on a GPU); its picks go to the JSON
  loop        the per-expert PyTorch loop (`kimi_kernels.experts.reference`)
  grouped_mm  permute + two `torch._grouped_mm` + index_add combine (torchtitan's path), where
              the GPU has it (sm90+)
and reports TFLOP/s, the ratio to a dense bf16 torch.matmul at its own TFLOP/s (the physical-limit
proxy), the speedups over the other two, and our per-stage split (routing, GEMMs, combine).

FLOPs: forward 3 GEMMs of 2*A*D*F each = 6*A*D*F; backward twice that; A = T*K.
"""

import argparse
import datetime
import json
import statistics

import torch
import torch.nn.functional as F_
import triton

from kimi_kernels.experts import stage_choice
from kimi_kernels.experts.combine import combine
from kimi_kernels.experts.grouped_gemm import _kernel_tuned as gemm_tuned
from kimi_kernels.experts.grouped_gemm import gate_up_swiglu, scatter_gemm, swiglu_backward
from kimi_kernels.experts.reference import expert_ffn_reference
from kimi_kernels.experts.routing import build_routing
from kimi_kernels.experts.triton_ffn import expert_ffn_triton
from kimi_kernels.experts.wgrad import _kernel_tuned as wgrad_tuned
from kimi_kernels.experts.wgrad import expert_wgrad
from kimi_kernels.testing import ROUTINGS
from kimi_kernels.tiles import block_m

# (name, T, K, E, D, F, routings)
SHAPES = [
    ("k2_e64", 4096, 8, 64, 7168, 2048, ["balanced"]),  # K2 layer (D, F, k) with E cut to fit one GPU
    ("k2_e64", 16384, 8, 64, 7168, 2048, ["balanced", "skewed"]),
    ("k2_e64", 65536, 8, 64, 7168, 2048, ["balanced"]),
    ("k2_e384", 8192, 8, 384, 7168, 2048, ["balanced"]),  # real K2 expert count, 170 rows/expert
    ("coarse_e8", 4096, 2, 8, 4096, 14336, ["balanced"]),  # Mixtral-like: few, wide experts
    ("coarse_e8", 16384, 2, 8, 4096, 14336, ["balanced", "skewed"]),
    ("ep_k1", 16384, 1, 16, 7168, 2048, ["balanced"]),  # the expert-parallel call: local rows, K = 1
]
QUICK = [("k2_e64", 16384, 8, 64, 7168, 2048, ["balanced"])]  # the targets' shape (2048 rows/expert)


def grouped_mm_ffn(x_TD, topk_ids_TK, topk_weights_TK, gate_up_EFD, down_EDF):
    """torchtitan-style: materialise the permuted rows, two grouped GEMMs, scatter-add combine."""
    T, K = topk_ids_TK.shape
    E = gate_up_EFD.shape[0]
    ids_A = topk_ids_TK.reshape(-1)
    order_A = torch.argsort(ids_A, stable=True)
    counts_E = torch.zeros(E, dtype=torch.int32, device=ids_A.device).scatter_add_(
        0, ids_A, torch.ones_like(ids_A, dtype=torch.int32))
    offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
    token_A = order_A // K
    h_AF2 = torch._grouped_mm(x_TD[token_A], gate_up_EFD.transpose(-2, -1), offs=offs_E)
    g, u = h_AF2.chunk(2, dim=-1)
    out_AD = torch._grouped_mm(F_.silu(g) * u, down_EDF.transpose(-2, -1), offs=offs_E)
    w_A = topk_weights_TK.reshape(-1)[order_A]
    return torch.zeros_like(x_TD).index_add_(0, token_A, out_AD * w_A[:, None])


def forced_stages(mode: str):
    """expert_ffn_triton with every stage's choice set to `mode` (kimi_kernels.experts.stage_choice)."""
    def ffn(*args):
        with stage_choice.forced(mode):
            return expert_ffn_triton(*args)
    return ffn


def cuda_time_ms(fn, budget_s=0.6, max_reps=20) -> float:
    """Median of CUDA-event timings after one warm-up call, with as many reps as fit the budget."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    first = start.elapsed_time(end)
    reps = max(2, min(max_reps, int(budget_s * 1e3 / max(first, 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


_dense_cache = {}


def dense_tflops(M, D, F) -> float:
    """TFLOP/s of a dense bf16 [M, D] @ [D, 3F] matmul (the forward's FLOPs in one GEMM)."""
    M = min(M, 65536)  # the rate has long saturated; keeps the output buffer small
    if (M, D, F) not in _dense_cache:
        a = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(D, 3 * F, device="cuda", dtype=torch.bfloat16)
        ms = cuda_time_ms(lambda: a @ b)
        _dense_cache[(M, D, F)] = 2 * M * D * 3 * F / ms / 1e9
    return _dense_cache[(M, D, F)]


def make_inputs(T, K, E, D, F, routing, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = ROUTINGS[routing](T, K, E, gen).cuda()
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(T, D, device=dev, dtype=bf, requires_grad=True)
    w = torch.rand(T, K, device=dev, dtype=bf, requires_grad=True)
    gate_up = (torch.randn(E, 2 * F, D, device=dev, dtype=bf) * D**-0.5).requires_grad_()
    down = (torch.randn(E, D, F, device=dev, dtype=bf) * F**-0.5).requires_grad_()
    return x, ids, w, gate_up, down


def time_impl(fn, inputs, mode):
    x, ids, w, gate_up, down = inputs
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(x, ids, w, gate_up, down)
    else:
        dy = torch.randn_like(x)

        def step():
            y = fn(x, ids, w, gate_up, down)
            torch.autograd.grad(y, (x, w, gate_up, down), dy)
    return cuda_time_ms(step)


def stage_split(inputs):
    """Our forward+backward stage by stage (ms), each timed alone on the same data, and for each
    stage whose autotuner ran here, every candidate's time (see `autotune_timings`)."""
    x, ids, w, gate_up, down = (t.detach() for t in inputs)
    T, K = ids.shape
    E, F2, D = gate_up.shape
    w_A = w.reshape(-1)
    r = build_routing(ids, E, block_m(T * K, E))
    out = x.new_empty(T * K, D)
    dy = torch.randn_like(x)
    s = gate_up.stride()
    candidates, calls = {}, {}

    def first_call(stage, fn):  # the call that autotunes, if this shape's key is new; timed below
        calls[stage] = fn
        result = []
        timings = autotune_timings(lambda: result.append(fn()))
        if timings:
            candidates[stage] = timings
        return result[0]

    act, h = first_call("gate_up_swiglu", lambda: gate_up_swiglu(x, gate_up, r, store_h=True))
    dh, _, act_w = first_call("swiglu_bwd", lambda: swiglu_backward(dy, down, h, w_A, r))
    first_call("down", lambda: scatter_gemm(act, down, down.stride(), out, r, gate_w_A=w_A))
    first_call("dx", lambda: scatter_gemm(dh, gate_up, (s[0], s[2], s[1]), out, r))
    first_call("wgrad_down", lambda: expert_wgrad(dy, act_w, r, True, False))
    first_call("wgrad_gate_up", lambda: expert_wgrad(dh, x, r, False, True))
    t = {"routing": cuda_time_ms(lambda: build_routing(ids, E, block_m(T * K, E)))}
    t.update((stage, cuda_time_ms(fn)) for stage, fn in calls.items())
    for stage in ("combine_fwd", "combine_bwd"):  # the same kernel, once in each direction
        t[stage] = cuda_time_ms(lambda: combine(out, K)) if K > 1 else 0.0
    total = sum(t.values())
    t["routing_plus_combine_share"] = (t["routing"] + t["combine_fwd"] + t["combine_bwd"]) / total
    return t, candidates


def _tuners():
    tuners = {f"expert_gemm{'_dual' if dual else ''}": k for dual, k in gemm_tuned.items()}
    tuners["expert_wgrad"] = wgrad_tuned
    return tuners


def autotune_timings(fn) -> dict:
    """Run fn once and return {config: median ms, fastest first} from the autotuner that timed its
    candidates during the call, if one did (the first call of a shape in a process). The autotuner
    keeps only the pick; these say by how much it won, and which candidates never do."""
    tuners = _tuners().values()
    for t in tuners:
        t.configs_timings = None
    fn()
    timed = {}
    for t in tuners:
        for cfg, ms in (getattr(t, "configs_timings", None) or {}).items():
            ms = ms[0] if isinstance(ms, (list, tuple)) else ms  # (median, p20, p80) from do_bench
            timed[str(cfg)] = round(ms, 4) if ms != float("inf") else None  # inf: it failed to run
    return dict(sorted(timed.items(), key=lambda kv: float("inf") if kv[1] is None else kv[1]))


def run(shapes, impls, save):
    rows = []
    for name, T, K, E, D, F, routings in shapes:
        for routing in routings:
            inputs = make_inputs(T, K, E, D, F, routing)
            A = T * K
            dense = dense_tflops(A, D, F)
            split, candidates = stage_split(inputs)
            for stage, timings in candidates.items():
                best = list(timings.items())[:3]
                print(f"  autotune {stage}: " + " | ".join(f"{ms} ms {cfg}" for cfg, ms in best)
                      + f" ({len(timings)} candidates)", flush=True)
            for mode, flops in (("fwd", 6 * A * D * F), ("fwd+bwd", 18 * A * D * F)):
                row = dict(shape=name, T=T, K=K, E=E, D=D, F=F, routing=routing, mode=mode,
                           rows_per_expert=A / E, dense_tflops=round(dense, 1))
                for impl, fn in impls.items():
                    try:
                        ms = time_impl(fn, inputs, mode)
                        row[impl] = dict(ms=round(ms, 3), tflops=round(flops / ms / 1e9, 1))
                    except (torch.OutOfMemoryError, RuntimeError) as err:  # record and move on
                        row[impl] = dict(error=str(err).splitlines()[0][:160])
                    torch.cuda.empty_cache()
                ours = row["triton"].get("ms")
                if ours:
                    row["triton"]["vs_dense"] = round(row["triton"]["tflops"] / dense, 3)
                    for other in impls:
                        if other != "triton" and "ms" in row[other]:
                            row[f"speedup_vs_{other}"] = round(row[other]["ms"] / ours, 2)
                if "ms" in row.get("auto", {}):
                    row["auto"]["vs_dense"] = round(row["auto"]["tflops"] / dense, 3)
                    if "ms" in row.get("grouped_mm", {}):
                        row["auto_speedup_vs_grouped_mm"] = round(row["grouped_mm"]["ms"] / row["auto"]["ms"], 2)
                if mode == "fwd+bwd":
                    row["stage_choices"] = stage_choice.choices()
                    row["triton_stages_ms"] = {k: round(v, 4) for k, v in split.items()}
                    row["autotune_candidates_ms"] = candidates
                rows.append(row)
                print(_fmt(row), flush=True)
                save(rows)  # after every row: a run cut short still leaves its figures
            del inputs
            torch.cuda.empty_cache()
    return rows


def _fmt(row):
    def cell(impl):
        r = row.get(impl, {})
        return f"{r['ms']:9.2f} ms {r['tflops']:6.1f} TF/s" if "ms" in r else f"{'n/a':>22}"
    ratios = " ".join(f"{k[11:]}x{v}" for k, v in row.items() if k.startswith("speedup_vs_"))
    vs = row["triton"].get("vs_dense", float("nan"))
    return (f"{row['shape']:10s} T={row['T']:6d} {row['routing']:8s} {row['mode']:7s} | triton {cell('triton')} "
            f"({vs:.0%} of dense {row['dense_tflops']}) | auto {cell('auto')} | loop {cell('loop')} | "
            f"grouped_mm {cell('grouped_mm')} | {ratios}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the K2-like shape the targets are judged on")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/kernels-<gpu>.json)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kimi_kernels.bench needs a CUDA GPU (the CPU path is the reference; nothing to time)")
    impls = {"triton": forced_stages("triton"), "auto": forced_stages("auto"), "loop": expert_ffn_reference}
    cap = torch.cuda.get_device_capability()
    if hasattr(torch, "_grouped_mm") and cap >= (9, 0):
        impls["grouped_mm"] = grouped_mm_ffn
    device = torch.cuda.get_device_name()
    meta = dict(device=device, capability=cap, date=datetime.date.today().isoformat(), torch=torch.__version__,
                triton=triton.__version__, dtype="bfloat16")
    out = args.out or f"benchmarks/kernels-{device.replace(' ', '_')}.json"

    def save(rows):
        with open(out, "w") as f:
            json.dump(dict(meta=meta, results=rows, tuned_configs=tuned_configs()), f, indent=1)

    run(QUICK if args.quick else SHAPES, impls, save)
    print(f"wrote {out}")


def tuned_configs():
    """What the autotuner chose, per kernel and key, to pin or to explain a figure."""
    return {name: {str(key): str(cfg) for key, cfg in t.cache.items()} for name, t in _tuners().items()}


if __name__ == "__main__":
    main()
