"""The planner (launch/plan.py) against real CPU runs: `python benchmarks/plan_validation.py [--no-distributed]`.

A script, not a test: prints planner vs measured per term and writes benchmarks/plan-validation-cpu.json.
The measurements are tests/test_plan.py's (imported from there, so the two cannot drift):
  state        weights, gradients, optimizer state and buffers that a real model and optim.build's
               optimizer hold after one step (tensor bytes, each storage once, 0-d counters left out);
  activations  bytes saved for backward by one forward, per recompute mode (launch.parallel.recompute's
               SavedTensorMeter: distinct storages packed by saved-tensor hooks, released ones at 0);
  peak         one process (LocalStepper, 2 micro-batches): tensor bytes alive when the second step
               starts plus torch.profiler's highest net allocation during it;
  deepspeed    2 gloo ranks under DeepSpeed ZeRO-1/2 (and EP = 2): the same peak per rank (median of
               three steps, collectives settled so gloo's worker thread frees nothing unrecorded),
               and the persistent terms by owner (tests/dist/plan_memory_check.py);
  pipeline     2, 3 and 4 gloo ranks as the stages of DeepSpeed's pipeline engine (1F1B, ZeRO-1,
               4 or 5 micro-batches), built as launch.train builds them: the same, per stage
               (tests/dist/plan_pipeline_check.py; the runs are tests/test_plan.py's PIPELINE_RUNS).
A CPU process's RSS is mostly the interpreter and torch's own code; these are the tensor bytes only.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "dist")]  # run as a script from anywhere

import torch  # noqa: E402

from launch.plan import Layout, plan  # noqa: E402
from moe.config import preset  # noqa: E402
from moe.model import Transformer  # noqa: E402
from test_plan import (PIPELINE_RUNS, local_expert_model, measured_peak, one_step, pipeline_stage_rows,  # noqa: E402
                       saved_activation_bytes)

STATE_RUNS = [("tiny", "adamw", 1), ("tiny", "muon", 1), ("tiny", "muonclip", 1), ("small", "adamw", 1),
              ("small", "muonclip", 1), ("tiny", "muon", 2), ("small", "adamw", 4)]
ACTIVATION_RUNS = [("tiny", 3, 17), ("tiny", 4, 64), ("small", 2, 33), ("small", 4, 128)]
PEAK_RUNS = [("tiny", "muon", 4, 64, "none"), ("small", "muonclip", 4, 128, "none"), ("small", "adamw", 2, 256, "none"),
             ("small", "adamw", 2, 256, "selective"), ("small", "adamw", 2, 256, "full")]


def row(label: str, planned: float, measured: float) -> dict:
    err = (planned - measured) / measured if measured else 0.0
    print(f"  {label:<58}{planned:>14,.0f}{measured:>14,.0f}{err:>+9.2%}")
    return {"run": label, "planned": planned, "measured": measured, "rel_error": err}


def header(title: str) -> None:
    print(f"\n{title}\n  {'':<58}{'planned B':>14}{'measured B':>14}{'error':>9}")


def state_rows() -> list[dict]:
    header("state after one step (one process; ep > 1: one rank's expert slice)")
    rows = []
    for name, opt, ep in STATE_RUNS:
        model = Transformer(preset(name)) if ep == 1 else local_expert_model(preset(name), ep)
        held = one_step(model, opt, B=2, T=16)
        terms = plan(Layout(model=name, gpus=ep, ep=ep, zero=0, optimizer=opt, precision="fp32", kernels="cpu",
                            seq_len=16, micro_batch=2))["memory"]["terms"]
        rows += [row(f"{name} {opt} ep={ep} {key}", terms[key], held[key]) for key in held]
    return rows


def activation_rows() -> list[dict]:
    header("saved for backward by one forward (fp32, CPU kernels)")
    rows = []
    for name, B, T in ACTIVATION_RUNS:
        for mode in ("none", "selective", "full"):
            cfg = preset(name)
            torch.manual_seed(0)
            measured = saved_activation_bytes(Transformer(cfg), mode, torch.randint(0, cfg.vocab_size, (B, T)),
                                              torch.randint(0, cfg.vocab_size, (B, T)))
            planned = plan(Layout(model=name, precision="fp32", kernels="cpu", seq_len=T, micro_batch=B,
                                  recompute=mode))["memory"]["terms"]["activations"]
            rows.append(row(f"{name} B={B} T={T} recompute={mode}", planned, measured))
    return rows


def peak_rows() -> list[dict]:
    header("peak tensor bytes of a real step (one process, 2 micro-batches)")
    rows = []
    for name, opt, B, T, mode in PEAK_RUNS:
        measured = measured_peak(name, opt, B, T, grad_accum=2, recompute=mode)
        planned = plan(Layout(model=name, precision="fp32", kernels="cpu", optimizer=opt, seq_len=T, micro_batch=B,
                              global_batch_tokens=2 * B * T, recompute=mode))["memory"]["total"]
        rows.append(row(f"{name} {opt} B={B} T={T} recompute={mode}", planned, measured))
    return rows


def deepspeed_rows() -> list[dict]:
    from harness import torchrun_json

    header("2 ranks under DeepSpeed (gloo), per rank")
    with tempfile.TemporaryDirectory() as tmp:
        ranks = torchrun_json("plan_memory_check.py", Path(tmp), timeout=300)
    rows = []
    for r, rank in enumerate(ranks):
        for key, case in rank["cases"].items():
            lay = Layout(model=case["model"], gpus=2, ep=case["ep"], zero=case["zero"], optimizer=case["optimizer"],
                         precision="fp32", kernels="cpu", seq_len=rank["T"], micro_batch=rank["B"],
                         global_batch_tokens=2 * rank["B"] * rank["T"] * rank["GA"], bucket_elems=rank["bucket"])
            memory = plan(lay)["memory"]
            for term in ("weights", "fp32_masters", "optimizer_state"):
                rows.append(row(f"rank {r} {key} {term}", memory["terms"][term], case[term]))
            rows.append(row(f"rank {r} {key} peak", memory["total"], case["peak"]))
    return rows


def pipeline_rows() -> list[dict]:
    from harness import torchrun_json

    rows = []
    for pp, T, GA, cases in PIPELINE_RUNS:
        header(f"{pp} pipeline stages under DeepSpeed (gloo), per stage, T={T}, {GA} micro-batches")
        with tempfile.TemporaryDirectory() as tmp:
            ranks = torchrun_json("plan_pipeline_check.py", Path(tmp), str(T), str(GA), *cases, nproc=pp, timeout=300)
        for stage, key, case, phases, planned, _ in pipeline_stage_rows(ranks):
            for term in ("weights", "fp32_masters", "optimizer_state"):
                rows.append(row(f"pp {pp} stage {stage} {key} {term}", phases["persistent"][term], case[term]))
            rows.append(row(f"pp {pp} stage {stage} {key} peak", planned, case["peak"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-distributed", action="store_true", help="skip the 2-rank DeepSpeed runs (~90 s)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "plan-validation-cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    result = {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
              "state": state_rows(), "activations": activation_rows(), "peak": peak_rows()}
    if not args.no_distributed:
        result["deepspeed"] = deepspeed_rows()
        result["pipeline"] = pipeline_rows()
    worst = {k: max(abs(r["rel_error"]) for r in v) for k, v in result.items() if isinstance(v, list)}
    result["worst_abs_rel_error"] = worst
    result["seconds"] = time.time() - start
    print("\nworst |error| per section: " + ", ".join(f"{k} {v:.2%}" for k, v in worst.items()))
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
