"""CPU training speed against transformers: `python benchmarks/cpu_vs_hf.py [--experts 8 32 128 512] [--out ...]`.

A script, not a test: prints a table and writes JSON (default benchmarks/cpu-vs-hf.json). For each
expert count E it builds the `small` preset with E routed experts (--hidden/--ffn/--layers shrink
it), exports it to transformers' DeepseekV3ForCausalLM (moe.hf.export_hf: identical weights,
checked by comparing logits), and times on --batch x --seq random tokens:
  step  one training step of each model: forward, the same cross-entropy on its logits, backward,
        torch.optim.AdamW step; ours, ours_reference (our model with KIMI_EXPERT_FFN=reference: the
        CPU path before kimi_kernels.experts.cpu_ffn) and hf (whatever experts/attention implementation
        from_pretrained picks, recorded in the JSON).
  ffn   the routed experts alone, forward+backward on the same tokens, routing and weights:
        ours (kimi_kernels.expert_ffn, the CPU path), reference (kimi_kernels.experts.reference), and transformers'
        DeepseekV3Experts with its grouped_mm and eager implementations.
The machine may be shared, so implementations are interleaved (order alternating per round), every
time is kept, medians are reported, and the load average is written at start and end.
"""

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import kimi_kernels  # noqa: E402
from kimi_kernels.experts.reference import expert_ffn_reference  # noqa: E402
from kimi_kernels.testing import make_problem  # noqa: E402
from moe.config import preset  # noqa: E402
from moe.hf import export_hf, to_hf_config  # noqa: E402
from moe.model import Transformer, eval_mode  # noqa: E402


def interleaved(fns: dict, rounds: int) -> dict:
    """Seconds of each callable per round, after one untimed warm-up call each; the order of the
    callables reverses every round so a slow stretch of a shared machine hits all of them."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def summary(seconds: list[float]) -> dict:
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "max_s": max(seconds), "all_s": seconds}


def paired_ratio(times: dict, slow: str, fast: str) -> float:
    """Median over rounds of times[slow] / times[fast]: both ran back to back in each round, so
    the ratio cancels most of the load that changes between rounds."""
    return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def step_fn(model, opt, inputs_BT, targets_BT, V):
    def step():
        opt.zero_grad(set_to_none=True)
        logits_BTV = model(inputs_BT).logits  # first positional: input ids, in both
        F.cross_entropy(logits_BTV.float().view(-1, V), targets_BT.reshape(-1)).backward()
        opt.step()
    return step


def forcing_reference(fn):
    """`fn` run with the expert FFN forced to kimi_kernels.experts.reference (kimi_kernels.expert_ffn's switch)."""
    def run():
        os.environ["KIMI_EXPERT_FFN"] = "reference"
        try:
            fn()
        finally:
            del os.environ["KIMI_EXPERT_FFN"]
    return run


def time_steps(cfg, args) -> dict:
    torch.manual_seed(0)
    ours = Transformer(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(ours, Path(tmp) / "ckpt")
        hf = DeepseekV3ForCausalLM.from_pretrained(Path(tmp) / "ckpt", dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    ids_BT = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
    inputs_BT, targets_BT = ids_BT[:, :-1], ids_BT[:, 1:]
    with torch.no_grad(), eval_mode(ours):
        hf.eval()
        logits_diff = (ours(inputs_BT[:2, :64]).logits - hf(inputs_BT[:2, :64]).logits).abs().max().item()
    ours.train(), hf.train()
    steps = {name: step_fn(m, torch.optim.AdamW(m.parameters(), lr=1e-4), inputs_BT, targets_BT, cfg.vocab_size)
             for name, m in (("ours", ours), ("hf", hf))}
    steps["ours_reference"] = forcing_reference(steps["ours"])  # the CPU path before kimi_kernels.experts.cpu_ffn
    times = interleaved(steps, args.repeats)
    return {"logits_max_abs_diff_before": logits_diff,
            "hf_experts_implementation": hf.config._experts_implementation,
            "hf_attn_implementation": hf.config._attn_implementation,
            "hf_over_ours_paired": paired_ratio(times, "hf", "ours"),
            **{name: summary(t) for name, t in times.items()}}


def hf_experts(cfg, implementation: str, gate_up_EFD, down_EDF) -> DeepseekV3Experts:
    hf_cfg = to_hf_config(cfg)
    hf_cfg._experts_implementation = implementation
    experts = DeepseekV3Experts(hf_cfg)
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up_EFD)
        experts.down_proj.copy_(down_EDF)
    return experts


def time_ffn(cfg, args) -> dict:
    T, K, E, D, F_ = args.batch * args.seq, cfg.num_experts_per_tok, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    x_TD, ids_TK, w_TK, gate_up_EFD, down_EDF = make_problem(T, K, E, D, F_, torch.float32, "random", device="cpu")
    dy_TD = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    hf = {name: hf_experts(cfg, name, gate_up_EFD, down_EDF) for name in ("grouped_mm", "eager")}
    impls = {
        "ours": lambda: kimi_kernels.expert_ffn(x_TD, ids_TK, w_TK, gate_up_EFD, down_EDF),
        "reference": lambda: expert_ffn_reference(x_TD, ids_TK, w_TK, gate_up_EFD, down_EDF),
        "hf_grouped_mm": lambda: hf["grouped_mm"](x_TD, ids_TK, w_TK),
        "hf_eager": lambda: hf["eager"](x_TD, ids_TK, w_TK),
    }
    with torch.no_grad():
        y_ours = impls["ours"]()
        max_diff = {name: (fn() - y_ours).abs().max().item() for name, fn in impls.items() if name != "ours"}

    def fwd_bwd(fn):
        def run():
            for t in (x_TD, w_TK, gate_up_EFD, down_EDF, *(p for m in hf.values() for p in m.parameters())):
                t.grad = None
            fn().backward(dy_TD)
        return run

    times = interleaved({name: fwd_bwd(fn) for name, fn in impls.items()}, args.repeats)
    return {"tokens": T, "output_max_abs_diff_vs_ours": max_diff,
            "hf_grouped_mm_over_ours_paired": paired_ratio(times, "hf_grouped_mm", "ours"),
            **{name: summary(t) for name, t in times.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 128, 512])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=None, help="hidden_size; default the small preset's (256)")
    parser.add_argument("--ffn", type=int, default=None, help="moe_intermediate_size; default the small preset's (128)")
    parser.add_argument("--layers", type=int, default=None, help="num_layers; default the small preset's (6)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per implementation")
    parser.add_argument("--skip", choices=["step", "ffn"], default=None, help="leave one of the two measurements out")
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "cpu-vs-hf.json"))
    args = parser.parse_args()
    if "KIMI_EXPERT_FFN" in os.environ:
        parser.error(f"KIMI_EXPERT_FFN = {os.environ['KIMI_EXPERT_FFN']!r} is set; unset it: this script times both paths itself")
    # The number of threads is taken from OMP_NUM_THREADS as torch sets it; on a shared 2-core
    # machine OMP_NUM_THREADS=1 avoids stalls where one thread waits for a descheduled other.
    overrides = {name: value for name, value in (("hidden_size", args.hidden), ("moe_intermediate_size", args.ffn),
                                                 ("num_layers", args.layers)) if value is not None}
    result = {
        "device": platform.processor() or f"CPU ({platform.machine()})",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "args": vars(args),
        "preset": "small",
        "overrides": overrides,
        "runs": {},
    }
    print(f"{result['device']}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads of {os.cpu_count()} CPUs, load average {os.getloadavg()}")
    print(f"{'E':>5} {'step ours':>10} {'ours ref':>9} {'step hf':>9} {'hf/ours':>8} | {'ffn ours':>9} {'reference':>10} "
          f"{'hf grouped':>11} {'hf eager':>9} {'hf_gmm/ours':>12}")
    print("(median seconds; ratios are medians of the per-round ratios, > 1: ours faster)")
    for E in args.experts:
        cfg = preset("small", num_experts=E, **overrides)
        run = {"load_average": os.getloadavg()}
        if args.skip != "step":
            run["step"] = time_steps(cfg, args)
            gc.collect()
        if args.skip != "ffn":
            run["ffn"] = time_ffn(cfg, args)
            gc.collect()
        result["runs"][f"E{E}"] = run

        def med(part, name):
            if part not in run:
                return float("nan")
            return run[part][name] if name.endswith("_paired") else run[part][name]["median_s"]

        print(f"{E:>5} {med('step', 'ours'):>10.3f} {med('step', 'ours_reference'):>9.3f} {med('step', 'hf'):>9.3f} "
              f"{med('step', 'hf_over_ours_paired'):>8.2f} | {med('ffn', 'ours'):>9.3f} {med('ffn', 'reference'):>10.3f} "
              f"{med('ffn', 'hf_grouped_mm'):>11.3f} {med('ffn', 'hf_eager'):>9.3f} "
              f"{med('ffn', 'hf_grouped_mm_over_ours_paired'):>12.2f}", flush=True)
        Path(args.out).write_text(json.dumps({**result, "load_average_at_end": os.getloadavg()}, indent=2) + "\n")
    print(f"load average at end {os.getloadavg()}; wrote {args.out}")


if __name__ == "__main__":
    main()
