"""Activation memory per recompute mode: `python benchmarks/recompute_memory.py [--presets tiny small] [--batch 4] [--seq-len 256]`.

A script, not a test: prints a table and writes JSON (default benchmarks/recompute-<device>.json).
For each preset and each mode of launch.parallel.recompute.apply_recompute, on one randomly
initialised model and one batch of random tokens:
  saved_bytes  what autograd keeps for the backward after the forward (SavedTensorMeter: distinct
               storages packed by saved-tensor hooks, parameters excluded, released ones at 0 bytes);
  step_s       forward + backward seconds, best of --repeats (after one warm-up step);
  on CUDA also peak_bytes, torch.cuda.max_memory_allocated over one step, and peak_over_start_bytes,
               that peak less what was allocated before the step (weights; gradients set to None).
CPU runs fp32; CUDA runs bf16 weights (as DeepSpeed's bf16 engine holds them). k2-2b is added on CUDA.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from launch.parallel.recompute import MODES, SavedTensorMeter, apply_recompute  # noqa: E402
from moe.config import PRESETS, preset  # noqa: E402
from moe.model import Transformer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model: Transformer, ids_BT, targets_BT, device: torch.device, repeats: int) -> dict:
    def step():
        model.zero_grad(set_to_none=True)
        model(ids_BT, targets_BT).loss.backward()

    with SavedTensorMeter(model) as meter:
        out = model(ids_BT, targets_BT)
    row = {"saved_bytes": meter.nbytes()}
    del meter, out
    step()  # warm-up: allocator, kernels, checkpoint's first call
    if device.type == "cuda":
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize()
        row["peak_bytes"] = torch.cuda.max_memory_allocated(device)
        row["peak_over_start_bytes"] = row["peak_bytes"] - start
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    row["step_s"] = best
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="+", default=None, choices=list(PRESETS),
                        help="default: tiny small, and k2-2b on CUDA")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON path; default benchmarks/recompute-<device>.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    presets = args.presets or (["tiny", "small", "k2-2b"] if device.type == "cuda" else ["tiny", "small"])
    B, T = args.batch, args.seq_len

    results = {}
    for name in presets:
        torch.manual_seed(0)
        model = Transformer(preset(name, max_seq_len=max(T, preset(name).max_seq_len))).to(device=device, dtype=dtype)
        g = torch.Generator().manual_seed(1)
        ids_BT = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g).to(device)
        targets_BT = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g).to(device)
        rows = {}
        for mode in MODES:
            apply_recompute(model, mode)  # each mode replaces the one before
            rows[mode] = measure(model, ids_BT, targets_BT, device, args.repeats)
        for mode in MODES:
            rows[mode]["saved_vs_none"] = rows[mode]["saved_bytes"] / rows["none"]["saved_bytes"]
            rows[mode]["step_vs_none"] = rows[mode]["step_s"] / rows["none"]["step_s"]
        results[name] = rows
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()})",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": B, "seq_len": T, "repeats": args.repeats,
        "results": results,
    }
    print(f"{report['device']}, {report['dtype']}, {report['threads']} threads, batch {B} x {T} tokens, "
          f"step = forward + backward, best of {args.repeats}")
    cuda = device.type == "cuda"
    print(f"{'preset':<7} {'mode':<10} {'saved MiB':>10} {'vs none':>8} {'step s':>8} {'vs none':>8}"
          + (f" {'peak MiB':>9} {'peak-start':>10}" if cuda else ""))
    for name, rows in results.items():
        for mode, r in rows.items():
            print(f"{name:<7} {mode:<10} {r['saved_bytes'] / 2**20:10.2f} {r['saved_vs_none']:8.2f} "
                  f"{r['step_s']:8.3f} {r['step_vs_none']:8.2f}"
                  + (f" {r['peak_bytes'] / 2**20:9.0f} {r['peak_over_start_bytes'] / 2**20:10.0f}" if cuda else ""))
    out = Path(args.out or Path(__file__).parent / f"recompute-{device.type}.json")
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
