"""Decode speed: `python benchmarks/decode_bench.py [--preset small] [--out benchmarks/decode-cpu.json]`.

A script, not a test: prints a table and writes JSON. Times greedy generation of --new-tokens tokens
after --prompt-len random prompt tokens, at each --batch, for
  ours_absorbed  moe.generate.generate, attention in latent space (DeepSeek-V2 §2.1.2)
  ours_per_head  the same with the cached latents up-projected to per-head K and V
  hf             transformers' DeepseekV3ForCausalLM.generate on the same weights (moe.hf.export_hf)
on one randomly initialised model; tokens/s = batch * new tokens / wall seconds (prefill included),
best of --repeats. Also prints the cache bytes per token of every preset, compressed vs per-head.
"""

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from transformers import DeepseekV3ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from moe.cache import cache_bytes_per_token, per_head_cache_bytes_per_token  # noqa: E402
from moe.config import PRESETS, preset  # noqa: E402
from moe.generate import generate  # noqa: E402
from moe.hf import export_hf  # noqa: E402
from moe.model import Transformer  # noqa: E402


def cache_table(dtype: torch.dtype) -> dict:
    rows = {}
    for name in PRESETS:
        cfg = preset(name)
        ours, per_head = cache_bytes_per_token(cfg, dtype), per_head_cache_bytes_per_token(cfg, dtype)
        rows[name] = {"latent_bytes_per_token": ours, "per_head_bytes_per_token": per_head, "ratio": per_head / ours}
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_seconds(fn, device: torch.device, repeats: int) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", choices=list(PRESETS))
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="JSON path; default benchmarks/decode-<device>.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU bf16 matmuls are slow
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    cfg = preset(args.preset)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(model, Path(tmp) / "ckpt")
        hf = DeepseekV3ForCausalLM.from_pretrained(Path(tmp) / "ckpt", dtype=dtype).to(device).eval()
    model = model.to(device=device, dtype=dtype)
    n, P = args.new_tokens, args.prompt_len

    runs = {}
    for B in args.batch:
        prompts_BP = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(B))
        prompts = prompts_BP.tolist()
        ids_BP = prompts_BP.to(device)

        def hf_generate(new=n):
            # eos None + min_new_tokens: every sequence runs to the full length, as ours do.
            out = hf.generate(ids_BP, attention_mask=torch.ones_like(ids_BP), do_sample=False, max_new_tokens=new,
                              min_new_tokens=new, eos_token_id=None, pad_token_id=0)
            return out[:, P:].tolist()

        impls = {
            "ours_absorbed": lambda new=n: generate(model, prompts, new, absorbed=True).tokens,
            "ours_per_head": lambda new=n: generate(model, prompts, new, absorbed=False).tokens,
            "hf": hf_generate,
        }
        results, tokens = {}, {}
        for name, fn in impls.items():
            fn(2)  # warm-up: allocator, kernels, HF's generation config
            seconds, tokens[name] = best_seconds(fn, device, args.repeats)
            results[name] = {"seconds": seconds, "tokens_per_s": B * n / seconds}
        for name in ("ours_absorbed", "ours_per_head"):
            same = sum(a == b for a, b in zip(tokens[name], tokens["hf"]))
            results[name]["sequences_equal_to_hf"] = f"{same}/{B}"
            results[name]["speedup_over_hf"] = results[name]["tokens_per_s"] / results["hf"]["tokens_per_s"]
        runs[f"batch_{B}"] = results

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "preset": args.preset,
        "prompt_len": P,
        "new_tokens": n,
        "repeats": args.repeats,
        "runs": runs,
        "cache_bytes_per_token_bf16": cache_table(torch.bfloat16),
    }
    print(f"{args.preset} on {report['device']}, {report['dtype']}, {report['threads']} threads, "
          f"prompt {P} + {n} new tokens, greedy, best of {args.repeats}")
    print(f"{'batch':>5}  {'impl':<14} {'seconds':>8} {'tok/s':>9} {'vs hf':>6}  same tokens as hf")
    for run, results in runs.items():
        for name, r in results.items():
            print(f"{run.removeprefix('batch_'):>5}  {name:<14} {r['seconds']:8.2f} {r['tokens_per_s']:9.1f} "
                  f"{r.get('speedup_over_hf', 1.0):5.2f}x  {r.get('sequences_equal_to_hf', '')}")
    print(f"\ncache bytes per token (bf16, all layers)\n{'preset':<8} {'latent':>10} {'per-head':>12} {'ratio':>6}")
    for name, r in report["cache_bytes_per_token_bf16"].items():
        print(f"{name:<8} {r['latent_bytes_per_token']:>10,} {r['per_head_bytes_per_token']:>12,} {r['ratio']:6.1f}")
    out = Path(args.out or Path(__file__).parent / f"decode-{device.type}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
