"""Optimizer-step benchmark: Newton-Schulz cost against the model's forward+backward.

    python -m optim.bench                      # CPU: `small` preset, 1 kimi-k2 expert per shape
    python -m optim.bench --preset k2-2b --experts 64 --batch-size 4 --seq-len 2048   # one GPU

Measures, on the chosen device:
  1. Newton-Schulz (5 steps) on Kimi K2's expert matrices, batched [E, M, N], as Muon runs them:
     gate_up_proj [2F, D] as its two [F, D] = [2048, 7168] halves (gate and up, `row_blocks` 2) and
     down_proj [D, F] = [7168, 2048] per expert; --experts of the 384 are timed and the per-expert
     time is multiplied out to all 384 experts of the 60 MoE layers (stated in the JSON). The fused
     [4096, 7168] gate_up matrix that Muon orthogonalised before the split is timed too, for comparison.
  2. For a preset that fits the device: one micro-batch's forward+backward, the whole optimizer step
     (Muon + AdamW groups), its Newton-Schulz part, the forward+backward with MLA's max-logit
     records switched on (what MuonClip costs in the forward), and QK-clip's re-measure forward
     (what MuonClip costs once per optimizer step).
  3. Kimi K2 at scale, by FLOPs: NS FLOPs per step over 6 * active params * tokens per step.
Timings are medians of --repeats runs after one warm-up. Writes benchmarks/optim-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import optim
from moe.config import preset
from moe.model import Transformer
from moe.params import count_parameters
from optim.muon import matrices, model_param_groups, zeropower_via_newtonschulz5
from optim.qk_clip import QKClip

# Per expert: (matrices, rows, cols) as Muon orthogonalises them.
K2_EXPERT_MATRICES = {"gate_up_proj (gate, up)": (2, 2048, 7168), "down_proj": (1, 7168, 2048)}
K2_FUSED_GATE_UP = (1, 4096, 7168)  # orthogonalised whole before row_blocks; not part of the step
K2_EXPERTS, K2_MOE_LAYERS = 384, 60
K2_TOKENS_PER_STEP = 67_000_000  # Kimi K2 tech report §3: global batch of ~67M tokens


def timed(fn, device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ns_flops(shape: tuple[int, ...], steps: int = 5) -> float:
    """Per NS step on the wide orientation m <= n: X X^T (2m^2 n), A A (2m^3), B X (2m^2 n)."""
    *batch, rows, cols = shape
    m, n = min(rows, cols), max(rows, cols)
    count = 1
    for b in batch:
        count *= b
    return count * steps * (4 * m * m * n + 2 * m ** 3)


def bench_k2_experts(device, experts: int, repeats: int) -> dict:
    out = {}
    for name, (blocks, rows, cols) in {**K2_EXPERT_MATRICES, "fused gate_up_proj (before the split)": K2_FUSED_GATE_UP}.items():
        G = torch.randn(experts * blocks, rows, cols, device=device)
        seconds = timed(lambda G=G: zeropower_via_newtonschulz5(G), device, repeats)
        per_expert = seconds / experts
        out[name] = {
            "shape_timed": list(G.shape),
            "seconds": seconds,
            "tflops": ns_flops(G.shape) / seconds / 1e12,
            "seconds_per_expert": per_expert,
            "seconds_all_384_experts_per_layer (extrapolated)": per_expert * K2_EXPERTS,
        }
        del G
    per_step = sum(out[name]["seconds_per_expert"] for name in K2_EXPERT_MATRICES) * K2_EXPERTS * K2_MOE_LAYERS
    out["seconds_per_step_all_moe_layers_one_device (extrapolated)"] = per_step
    return out


def muon_matrices(model) -> list[tuple[int, ...]]:
    """The [count, rows, cols] batches Muon orthogonalises for `model`: each parameter's row blocks."""
    shapes = []
    for group in model_param_groups(model):
        if group["use_muon"]:
            shapes += [matrices(p.shape, group["row_blocks"]) for p in group["params"]]
    return shapes


def k2_flop_ratio() -> dict:
    cfg = preset("kimi-k2")
    with torch.device("meta"):
        model = Transformer(cfg)
    ns = sum(ns_flops(shape) for shape in muon_matrices(model))
    active = count_parameters(model)["active"]
    train = 6 * active * K2_TOKENS_PER_STEP
    return {"ns_flops_per_step": ns, "train_flops_per_step (6 * active * tokens)": train,
            "active_params": active, "tokens_per_step": K2_TOKENS_PER_STEP, "ns_over_train": ns / train}


def bench_preset(name: str, device, batch_size: int, seq_len: int, repeats: int) -> dict:
    torch.manual_seed(0)
    cfg = preset(name)
    with device:  # built in place: a 2B-parameter CPU init and copy would dominate the run
        model = Transformer(cfg)
    opt = optim.build("muon", model, lr=1e-3)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len + 1), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")

    def fwd_bwd():
        model.zero_grad(set_to_none=False)
        with autocast:
            loss = model(ids[:, :-1], ids[:, 1:]).loss
        loss.backward()

    t_fwd_bwd = timed(fwd_bwd, device, repeats)
    for attn in model.attentions():
        attn.record_max_logits = True
    t_fwd_bwd_rec = timed(fwd_bwd, device, repeats)
    # MuonClip's re-measure: one no-grad forward of the micro-batch with a max-logit pass per MLA
    # (tau out of reach, so the pass is timed without the row scalings of a clip).
    qk_clip = QKClip(model, tau=float("inf"), remeasure=True)
    fwd_bwd()
    batch = qk_clip._batch

    def remeasure():
        qk_clip._batch = batch
        qk_clip()

    t_remeasure = timed(remeasure, device, repeats)
    for attn in model.attentions():
        attn.record_max_logits = False
    fwd_bwd()
    # The step changes the weights; timing it repeatedly on the same gradients is fine for speed.
    t_step = timed(opt.step, device, repeats)
    grads = [p.grad.reshape(matrices(p.shape, g["row_blocks"])) for g in opt.param_groups if g["use_muon"] for p in g["params"]]
    t_ns = timed(lambda: [zeropower_via_newtonschulz5(grad) for grad in grads], device, repeats)
    counts = count_parameters(model)
    return {
        "preset": name, "params_total": counts["total"], "params_active": counts["active"],
        "tokens_per_micro_batch": batch_size * seq_len, "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "fwd_bwd_s": t_fwd_bwd,
        "fwd_bwd_with_max_logit_records_s": t_fwd_bwd_rec,
        "max_logit_record_overhead": t_fwd_bwd_rec / t_fwd_bwd - 1,
        "qk_clip_remeasure_s (one per optimizer step)": t_remeasure,
        "qk_clip_remeasure_over_fwd_bwd": t_remeasure / t_fwd_bwd,
        "optimizer_step_s (Muon + AdamW groups)": t_step,
        "newton_schulz_s": t_ns,
        "newton_schulz_flops": sum(ns_flops(shape) for shape in muon_matrices(model)),
        "optimizer_step_over_fwd_bwd": t_step / t_fwd_bwd,
        "newton_schulz_over_fwd_bwd": t_ns / t_fwd_bwd,
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, help="default: k2-2b on CUDA, small on CPU")
    p.add_argument("--experts", type=int, default=None, help="K2 experts timed per shape (default: 32 GPU, 1 CPU)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="default: benchmarks/optim-<cpu|gpu>.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    result = {
        "device": torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "ns_dtype": "bf16" if gpu else "fp32",
        "kimi_k2_experts": bench_k2_experts(device, args.experts or (32 if gpu else 1), args.repeats),
        "kimi_k2_flop_ratio": k2_flop_ratio(),
        "preset": bench_preset(args.preset or ("k2-2b" if gpu else "small"), device, args.batch_size or (4 if gpu else 16),
                               args.seq_len or (2048 if gpu else 256), args.repeats),
    }
    print(json.dumps(result, indent=2))
    out = args.out or f"benchmarks/optim-{'gpu' if gpu else 'cpu'}.json"
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
