"""Training-step speed, measured: `python -m launch.bench --preset k2-2b --steps 10`.

Trains a preset for a fixed number of optimizer steps on synthetic tokens, one process, as
`launch.train` does on one device (bf16 autocast on a GPU, fp32 on CPU; the same stepper, router
bias update and QK-clip). For each variant it prints and writes to JSON: step time, tokens/s, MFU
(6 x active parameters + attention, over the GPU's bf16 peak), peak memory (GPU), the bytes autograd
keeps for the backward, and where the time goes by stage (from torch.profiler over one step).

A variant is the default set-up with some switches changed, so each optimisation's gain is measured
alone, in the same process, on the same tokens:
  --variant sdpa:attention=sdpa --variant ref:expert_ffn=reference --variant ce:loss_chunk=4096
Switches: attention (flash | sdpa), expert_ffn (kernel | reference), loss_chunk (tokens, 0 = whole
logits), recompute (none | selective | full), optimizer (a registry name), compile (0 | 1),
weight_casts (step: bf16 weight copies made once per optimizer step | micro: once per micro-batch),
norm (kernel: the Triton RMSNorm on CUDA | reference), expert_stages (auto: each expert-FFN stage on our
kernel or torch._grouped_mm, whichever times faster | triton | grouped_mm; kimi_kernels/experts/stage_choice.py).
The default variant, always run first, is attention=flash, expert_ffn=kernel, loss_chunk=0,
recompute=none, optimizer=muonclip, compile=0, weight_casts=step, norm=kernel, expert_stages=auto (on CPU "flash" and "kernel" mean SDPA and the CPU
grouped-GEMM path: kimi_kernels/__init__.py chooses by device).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import optim
from launch.metrics.mfu import flops_per_token, gpu_peak_flops
from launch.parallel.engine import LocalStepper, finish_step
from launch.parallel.recompute import MODES as RECOMPUTE_MODES
from launch.parallel.recompute import SavedTensorMeter, apply_recompute
from launch.runtime import autocast
from launch.train import accumulate
from moe.config import PRESETS, preset
from moe.model import Transformer
from moe.params import count_parameters

DEFAULTS = {"attention": "flash", "expert_ffn": "kernel", "loss_chunk": 0, "recompute": "none",
            "optimizer": "muonclip", "compile": 0, "weight_casts": "step", "norm": "kernel",
            "expert_stages": "auto"}
_CHOICES = {"attention": ("flash", "sdpa"), "expert_ffn": ("kernel", "reference"), "recompute": RECOMPUTE_MODES,
            "compile": (0, 1), "weight_casts": ("step", "micro"), "norm": ("kernel", "reference"),
            "expert_stages": ("auto", "triton", "grouped_mm")}

# Stage of a profiler row, by the first pattern its lower-cased name contains (first match wins).
STAGES = [
    ("communication", ("nccl", "gloo", "all_reduce", "all_to_all", "allreduce")),
    ("expert_ffn", ("swiglu", "scatter_gemm", "wgrad", "_combine", "routing", "grouped_mm", "kimi::", "gate_up")),
    ("attention", ("flash", "_attn", "attention", "fmha", "cudnn", "sdpa")),
    ("loss", ("cross_entropy", "log_softmax", "logsumexp", "nll_loss")),
    ("norm", ("rms_norm", "norm")),
    ("optimizer", ("foreach", "adam", "newton", "muon", "lerp")),
    ("matmul", ("gemm", "aten::mm", "aten::addmm", "bmm", "matmul", "cutlass", "xmma", "nvjet", "aten::linear")),
    ("copy_cast", ("copy", "to_copy", "cast", "fill", "cat", "index", "gather", "scatter")),
    ("elementwise", ("mul", "add", "silu", "exp", "sigmoid", "where", "sub", "div", "pow", "sqrt", "neg", "elementwise",
                     "vectorized", "reduce", "sum", "mean", "max")),
]


def stage_of(name: str) -> str:
    lowered = name.lower()
    return next((stage for stage, patterns in STAGES if any(p in lowered for p in patterns)), "other")


def parse_variant(text: str) -> tuple[str, dict]:
    """'name:key=value,key=value' -> (name, switches over DEFAULTS); a clear error naming the bad part."""
    name, sep, body = text.partition(":")
    if not sep or not name:
        raise ValueError(f"--variant {text!r}: write NAME:KEY=VALUE[,KEY=VALUE...], e.g. sdpa:attention=sdpa")
    switches = dict(DEFAULTS)
    for item in filter(None, body.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in DEFAULTS:
            raise ValueError(f"--variant {text!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(DEFAULTS)}")
        if isinstance(DEFAULTS[key], int):
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"--variant {text!r}: {key} = {value!r} is not an integer") from None
        if key in _CHOICES and value not in _CHOICES[key]:
            raise ValueError(f"--variant {text!r}: {key} = {value!r}; valid: {', '.join(map(str, _CHOICES[key]))}")
        if key == "loss_chunk" and value < 0:
            raise ValueError(f"--variant {text!r}: loss_chunk = {value} must be >= 0")
        if key == "optimizer":
            optim.check(value)
        switches[key] = value
    return name, switches


@contextmanager
def kernel_choice(switches: dict):
    """The kernels' environment switches (kimi_kernels/__init__.py reads them at each call) for one variant."""
    saved = {k: os.environ.get(k) for k in ("KIMI_ATTENTION", "KIMI_EXPERT_FFN", "KIMI_RMSNORM", "KIMI_EXPERT_STAGES")}
    os.environ["KIMI_EXPERT_STAGES"] = switches["expert_stages"]
    os.environ["KIMI_ATTENTION"] = switches["attention"]
    os.environ["KIMI_RMSNORM"] = "reference" if switches["norm"] == "reference" else "kernel"
    os.environ["KIMI_EXPERT_FFN"] = "reference" if switches["expert_ffn"] == "reference" else "triton"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_step(stepper, model, tokens_SBT, step: int, grad_accum: int, device, casts_once: bool) -> float:
    """launch.train's step on one device: accumulate the micro-batches, step, update the router biases."""
    first = step * grad_accum
    batches = ((t[:, :-1], t[:, 1:]) for t in (tokens_SBT[(first + i) % len(tokens_SBT)] for i in range(grad_accum)))
    losses = accumulate(stepper, batches, grad_accum, device, None, casts_once=casts_once)
    finish_step(model, stepper.step())
    return float(losses[0]) / grad_accum


def _breakdown(prof, device: torch.device, top: int) -> dict:
    rows = prof.key_averages()
    on_gpu = device.type == "cuda"
    timed = [(r.key, (r.self_device_time_total if on_gpu else r.self_cpu_time_total)) for r in rows]
    timed = [(k, t) for k, t in timed if t > 0]
    total = sum(t for _, t in timed) or 1.0
    stages: dict[str, float] = {}
    for key, t in timed:
        stages[stage_of(key)] = stages.get(stage_of(key), 0.0) + t
    ops = sorted(timed, key=lambda kt: -kt[1])[:top]
    return {"clock": "device" if on_gpu else "cpu", "total_ms": total / 1e3,
            "stages": {s: round(t / total, 4) for s, t in sorted(stages.items(), key=lambda st: -st[1])},
            "top_ops": [{"name": k, "ms": round(t / 1e3, 3), "share": round(t / total, 4), "stage": stage_of(k)}
                        for k, t in ops]}


def run_variant(name: str, switches: dict, args, device: torch.device) -> dict:
    torch.manual_seed(args.seed)
    cfg = preset(args.preset)
    model = Transformer(cfg).to(device).train()
    model.loss_chunk_tokens = switches["loss_chunk"]
    apply_recompute(model, switches["recompute"])
    counts = count_parameters(model)
    optimizer = optim.build(switches["optimizer"], model, lr=args.lr, weight_decay=0.1)
    stepper = LocalStepper(model, optimizer, grad_accum=args.grad_accum, grad_clip=1.0)
    if switches["compile"]:
        stepper.forward = torch.compile(stepper.forward)
    g = torch.Generator().manual_seed(args.seed + 1)
    tokens_SBT = torch.randint(0, cfg.vocab_size, (4, args.micro_batch, args.seq_len + 1), generator=g).to(device)
    tokens_per_step = args.micro_batch * args.seq_len * args.grad_accum
    casts_once = switches["weight_casts"] == "step"
    with kernel_choice(switches):
        with SavedTensorMeter(model) as meter:  # one forward's saved bytes, before any timing
            with autocast(device):
                out = model(tokens_SBT[0][:, :-1], tokens_SBT[0][:, 1:])
            saved_bytes = meter.nbytes()
        del out
        model.zero_grad(set_to_none=True)
        for router in model.routers():
            router.tokens_per_expert_E.zero_()
        for attn in model.attentions():
            attn.reset_max_logits()
        losses, times, warmup_times = [], [], []  # the first warmup step holds compile and autotune time
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for step in range(args.warmup + args.steps):
            _sync(device)
            start = time.perf_counter()
            losses.append(_one_step(stepper, model, tokens_SBT, step, args.grad_accum, device, casts_once))
            _sync(device)
            (times if step >= args.warmup else warmup_times).append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            _one_step(stepper, model, tokens_SBT, args.warmup + args.steps, args.grad_accum, device, casts_once)
            _sync(device)
    step_s = statistics.median(times)
    step_flops = flops_per_token(cfg, counts["active"], args.seq_len) * tokens_per_step
    peak_flops = gpu_peak_flops(device)
    record = {
        "switches": switches, "step_s_median": step_s, "step_s_all": times, "warmup_s": warmup_times, "tokens_per_step": tokens_per_step,
        "tokens_per_s": tokens_per_step / step_s, "mfu": None if peak_flops is None else step_flops / step_s / peak_flops,
        "peak_memory_bytes": peak, "saved_activation_bytes": saved_bytes, "loss_first": losses[0],
        "loss_last": losses[-1], "breakdown": _breakdown(prof, device, args.top_ops),
    }
    mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%"
    mem = "" if peak is None else f", peak {peak / 2**30:.2f} GiB"
    stages = ", ".join(f"{s} {100 * f:.0f}%" for s, f in list(record["breakdown"]["stages"].items())[:5])
    print(f"{name:>12}: {step_s * 1e3:8.1f} ms/step, {record['tokens_per_s']:9.0f} tok/s, MFU {mfu}{mem}, "
          f"saved {saved_bytes / 2**20:.1f} MiB; {stages}", flush=True)
    return record


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="k2-2b", choices=sorted(PRESETS))
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per variant")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (autotuning, compile, allocator)")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=8192)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                    help="a variant besides the default (repeatable); see above")
    ap.add_argument("--top-ops", type=int, default=15, help="profiler rows kept per variant")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/bench-<preset>-<device>.json)")
    args = ap.parse_args(argv)
    for name in ("steps", "micro_batch", "seq_len", "grad_accum"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} = {getattr(args, name)} must be >= 1")
    if args.warmup < 0:
        ap.error(f"--warmup = {args.warmup} must be >= 0")
    try:
        variants = [("default", dict(DEFAULTS))] + [parse_variant(v) for v in args.variant]
    except ValueError as err:
        ap.error(str(err))
    if len({n for n, _ in variants}) != len(variants):
        ap.error(f"variant names must differ: {[n for n, _ in variants]}")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    elif args.device in ("cpu", "cuda"):
        device = torch.device(args.device)
    else:
        ap.error(f"--device = {args.device!r}; valid: auto, cpu, cuda")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})"
    print(f"{args.preset} on {device_name}: {args.micro_batch} x {args.seq_len} tokens x {args.grad_accum} "
          f"micro-batches per step, {args.steps} timed steps after {args.warmup}", flush=True)
    result = {"device": device_name, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "args": vars(args),
              "variants": {name: run_variant(name, switches, args, device) for name, switches in variants}}
    base = result["variants"]["default"]["step_s_median"]
    for name, record in result["variants"].items():
        record["speedup_vs_default"] = base / record["step_s_median"]
    tag = "cuda" if device.type == "cuda" else "cpu"
    out = Path(args.out or Path(__file__).resolve().parent.parent / "benchmarks" / f"bench-{args.preset}-{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
