"""What one rank allocates when launch.train builds a fresh model under --pp-size / --ep-size: the
model is built on the meta device, cut, and only the rank's pipeline stage, with its slice of each
MoE block's experts, is allocated and initialised (moe/model.py's materialize). Before, every rank
built the whole model in host memory first.

For each layout this prints and writes, per rank kind (stage s, expert-parallel rank 0):
parameters held, and with --measure the peak resident memory (RSS) and seconds of a fresh process
doing only that build, beside a process that builds the whole model the ordinary way. With
--source DIR (a Hugging Face directory or one of our checkpoints, as --init-from takes) each part is
then also read from DIR, as launch.train --init-from does under that layout; --make-hf DIR first
writes a random model of the preset there (Hugging Face format).

    python benchmarks/partial_build.py --preset kimi-k2 --pp-size 16 --ep-size 8      # counts only
    python benchmarks/partial_build.py --preset k2-2b --pp-size 4 --ep-size 2 --measure \\
        --out benchmarks/partial-build-cpu.json
    python benchmarks/partial_build.py --preset k2-2b --make-hf /tmp/k2-2b-hf --measure \\
        --source /tmp/k2-2b-hf --out benchmarks/partial-load-hf-cpu.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from launch.parallel.pipeline import PipelineStage, stage_bounds  # noqa: E402
from moe.config import preset  # noqa: E402
from moe.model import Transformer, materialize  # noqa: E402
from moe.moe import RoutedExperts  # noqa: E402


def slice_experts(model: Transformer, ep: int, ep_rank: int) -> Transformer:
    """`model` (on meta) with each MoE block's experts cut to rank ep_rank's 1/ep, as
    launch/parallel/expert_parallel.py holds them; launch.train does this before the pipeline cut."""
    for block in model.layers:
        experts = getattr(block.mlp, "experts", None)
        if isinstance(experts, RoutedExperts) and ep > 1:
            E, twoF, D = experts.gate_up_proj.shape
            with torch.device("meta"):
                local = RoutedExperts(E // ep, D, twoF // 2)
            local.first_expert = ep_rank * (E // ep)
            block.mlp.experts = local
    return model


def rank_part(model: Transformer, pp: int, stage: int) -> nn.Module:
    """Pipeline stage `stage` of `model` (full-model names), as launch/parallel/pipeline.py cuts it."""
    bounds = stage_bounds(model, pp)
    return PipelineStage(model, bounds[stage], bounds[stage + 1], stage == 0, stage == pp - 1, grad_accum=1)


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def fmt(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def child(args) -> dict:
    """Runs in a fresh process: one build, its peak RSS and time."""
    import deepspeed.runtime.utils  # noqa: F401  (stage_bounds imports it: not part of the build's time)
    from launch.checkpoint.pretrained import part_source
    import moe.hf  # noqa: F401  (transformers: imported before the clock starts)

    torch.manual_seed(0)
    start = time.perf_counter()
    if args.child == "whole":
        module = Transformer(preset(args.preset))
        if args.source:  # the whole model read (before, every rank read it all; import_hf holds transformers' copy too)
            part_source(str(args.source)).load_into(module)
    else:
        with torch.device("meta"):
            model = Transformer(preset(args.preset))
        stage, ep_rank = map(int, args.child.split(","))
        slice_experts(model, args.ep_size, ep_rank)
        source = part_source(str(args.source)) if args.source else None
        if args.source and (source is None or source.cfg != model.cfg):
            raise SystemExit(f"--source {args.source}: not a source of the {args.preset} preset's model")
        # As launch.train: the part read from the source is allocated and read, never drawn first.
        module = materialize(rank_part(model, args.pp_size, stage), torch.device("cpu"),
                             model.init_seed, model.cfg.init_std, load=source.load_into if source else None)
    seconds = time.perf_counter() - start
    # VmHWM, this address space's peak: ru_maxrss would carry the parent's peak across exec (Linux).
    status = Path("/proc/self/status").read_text()
    rss_gib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 2**20  # KiB
    return {"params": count(module), "seconds": round(seconds, 2), "peak_rss_gib": round(rss_gib, 2)}


def measure(args, what: str) -> dict:
    cmd = [sys.executable, __file__, "--preset", args.preset, "--pp-size", str(args.pp_size),
           "--ep-size", str(args.ep_size), "--child", what, *(["--source", str(args.source)] if args.source else [])]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="k2-2b")
    parser.add_argument("--pp-size", type=int, default=4)
    parser.add_argument("--ep-size", type=int, default=2)
    parser.add_argument("--measure", action="store_true", help="also build each part in a fresh process: RSS, time")
    parser.add_argument("--source", type=Path, help="read each part from this HF directory or checkpoint")
    parser.add_argument("--make-hf", type=Path, help="first write a random model of the preset here (HF format)")
    parser.add_argument("--out", type=Path, help="JSON file to write")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.make_hf:
        from moe.hf import export_hf

        torch.manual_seed(0)
        export_hf(Transformer(preset(args.preset)), args.make_hf)  # refuses a non-empty directory
    with torch.device("meta"):
        model = Transformer(preset(args.preset))
    if model.cfg.num_experts % args.ep_size:
        raise SystemExit(f"--ep-size {args.ep_size} must divide num_experts = {model.cfg.num_experts}")
    total = count(model)
    slice_experts(model, args.ep_size, 0)
    bounds = stage_bounds(model, args.pp_size)
    # Expert-parallel ranks of one stage hold the same number of parameters: rank 0 stands for all.
    parts = [{"stage": s, "blocks": [bounds[s], bounds[s + 1]],
              "params": count(rank_part(model, args.pp_size, s))} for s in range(args.pp_size)]
    result = {"preset": args.preset, "pp_size": args.pp_size, "ep_size": args.ep_size, "params_total": total,
              "source": None if args.source is None else str(args.source),
              "params_largest_rank": max(p["params"] for p in parts), "parts": parts,
              "date": date.today().isoformat(), "device": "cpu"}
    print(f"{args.preset}: {fmt(total)} parameters; PP {args.pp_size} x EP {args.ep_size}")
    if args.measure:
        result["whole"] = measure(args, "whole")
        print(f"  whole model{', read from the source' if args.source else ''}, as every rank built it before: {fmt(result['whole']['params'])}, "
              f"peak RSS {result['whole']['peak_rss_gib']} GiB, {result['whole']['seconds']} s")
    for part in parts:
        line = f"  stage {part['stage']} (blocks {part['blocks'][0]}-{part['blocks'][1] - 1}), EP rank 0: " \
               f"{fmt(part['params'])} ({part['params'] / total:.1%})"
        if args.measure:
            part.update(measure(args, f"{part['stage']},0"))
            line += f", peak RSS {part['peak_rss_gib']} GiB, {part['seconds']} s"
        print(line)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
