"""The TRM demo, one command on a CPU: `python -m trm.demo` (console script `kimi-trm-demo`).

On one set of generated Sudoku puzzles (the hardest of a larger pool, trm/data/sudoku.py), the same
network is trained three times for the same training time:
    trm              recursion (T = 2, n = 2: DEMO_MODEL below) and deep supervision (n_sup = 3 steps)
    no-recursion     T = 1, n = 1: one pass of f per supervision step
    no-deep-sup      n_sup = 1: one supervision step per example, with the full recursion
and each is scored on the same held-out puzzles (validation during training, test once at the end
with the weights validation chose). The paper claims recursion and deep supervision each matter;
README "Tiny Recursive Model" has what this demo measured, and the earlier settings where it did not show.
`--steps N` trains every variant N optimizer steps instead of a fixed time.

Writes into --out-dir (default runs/trm-demo-<time>): one ordinary run per variant, results.json
and demo.png.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

from launch.metrics.log import read_metrics
from launch.checkpoint.run_dir import new_demo_dir
from launch.runtime import run_cli
from moe.config import ConfigError
from trm.data import build
from trm.run_config import parse
from trm.train import run

VARIANTS = {"trm": {}, "no-recursion": {"T": 1, "n": 1}, "no-deep-sup": {"n_sup": 1}}
# A CPU budget of minutes, not the paper's day: lr 1e-3 rather than 1e-4 (at 1e-4 a 4x4 run had solved
# nothing after 400 steps; at 1e-3 it solved all of its validation puzzles), weight decay 0.1, 32 slots.
SCHEDULE = ["--lr", "1e-3", "--weight-decay", "0.1", "--batch-size", "32", "--warmup-steps", "50"]
# The recursion, sized for minutes: T = 2, n = 2 (the paper's T = 2, n = 2 ablation scored 73.7% against
# T = 3, n = 6's 87.4% on Sudoku-Extreme) and 3 supervision steps, not the paper's 3, 6 and 16. At T = 3, n = 6 one
# update costs 5.8x the no-recursion network's, and at n_sup = 8 an example holds its slot for up to 8
# updates: in 200 s TRM then had too few updates to learn (README "Tiny Recursive Model" has those runs).
# Here TRM's update costs about 2x, and it has 3x the no-recursion network's depth per supervision step.
DEMO_MODEL = {"T": 2, "n": 2, "n_sup": 3}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trm.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", help="default: $KIMI_MOE_RUNS (or runs)/trm-demo-<time>; must not exist")
    p.add_argument("--size", type=int, default=6, help="Sudoku board: 4, 6 or 9")
    p.add_argument("--train", type=int, default=3000, help="training puzzles")
    p.add_argument("--val", type=int, default=200, help="validation puzzles")
    p.add_argument("--test", type=int, default=200, help="test puzzles")
    p.add_argument("--budget-s", type=int, default=200, help="training seconds per variant (the same compute)")
    p.add_argument("--steps", type=int, default=0,
                   help="train every variant this many optimizer steps instead (the same number of updates); 0: off")
    p.add_argument("--preset", default="tiny-sudoku-mlp")
    p.add_argument("--model", default="{}", help="TRMConfig fields for every variant (YAML), over the demo's "
                   f"{DEMO_MODEL} and under the variant's own")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from " + ", ".join(VARIANTS))
    p.add_argument("--trm-arg", action="append", default=[], metavar="FLAG=VALUE",
                   help="extra trm.train flag for every variant, e.g. --trm-arg=--lr=3e-4 (repeatable)")
    return p


def plot(runs: dict[str, Path], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.4), dpi=110)
    for name, path in runs.items():
        evals = [r for r in read_metrics(path / "metrics.jsonl") if "val_exact" in r]
        axes[0].plot([r.get("train_s", 0) for r in evals], [r["val_exact"] for r in evals], "o-", label=name)
        axes[1].plot([r["step"] for r in evals], [r["val_exact"] for r in evals], "o-", label=name)
        last = evals[-1]["val_exact_by_step"]
        axes[2].plot(range(1, len(last) + 1), last, "o-", label=name)
    axes[0].set(xlabel="training seconds (2 CPU cores)", ylabel="exact accuracy (EMA weights)", ylim=(0, 1),
                title="validation puzzles solved, by compute")
    axes[1].set(xlabel="optimizer step", ylabel="exact accuracy (EMA weights)", ylim=(0, 1),
                title="validation puzzles solved, by update")
    axes[2].set(xlabel="supervision step", ylabel="exact accuracy", ylim=(0, 1),
                title="after each supervision step, end of training")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    def go():
        names = [v for v in args.variants.split(",") if v]
        unknown = [v for v in names if v not in VARIANTS]
        if unknown:
            raise ConfigError(f"--variants: {unknown[0]!r} is not one of {', '.join(VARIANTS)}")
        given = yaml.safe_load(args.model) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"--model {args.model!r}: give a mapping of TRMConfig fields, e.g. '{{hidden_size: 64}}'")
        base_model = {**DEMO_MODEL, **given}
        root = new_demo_dir(args, ("train", "val", "test", "budget_s"), "trm-demo")
        budget = (["--steps", str(args.steps)] if args.steps else
                  ["--steps", "1000000", "--time-budget-s", str(args.budget_s)])
        task_args = {"size": args.size, "train": args.train, "val": args.val, "test": args.test}
        t0 = time.perf_counter()
        data = build("sudoku", task_args, args.seed)
        results = {"data": data.info, "data_s": round(time.perf_counter() - t0, 1), "variants": {}}
        print(f"{args.size}x{args.size} Sudoku: {args.train} train / {args.val} val / {args.test} test puzzles in "
              f"{results['data_s']} s; hardness {data.info['hardness']}", file=sys.stderr)
        for name in names:
            flags = ["--preset", args.preset, "--task-args", json.dumps(task_args), "--seed", str(args.seed),
                     "--model", json.dumps({**base_model, **VARIANTS[name]}), *budget,
                     "--eval-every", "100", "--checkpoint-every", "0", "--out-dir", str(root / name), *SCHEDULE,
                     *args.trm_arg]
            summary = run(parse(flags), data)
            results["variants"][name] = {"steps": summary["steps"], "train_s": summary["train_s"],
                                         "best_val": summary["best_val"], "test_exact": summary["test"]["test_exact"],
                                         "test_exact_by_step": summary["test"]["test_exact_by_step"],
                                         "model": {**base_model, **VARIANTS[name]}}
        results["wall_s"] = round(time.perf_counter() - t0, 1)
        (root / "results.json").write_text(json.dumps(results, indent=2))
        budget_text = f"{args.steps} optimizer steps" if args.steps else f"{args.budget_s} s of training"
        results["budget"] = budget_text
        plot({n: root / n for n in names}, root / "demo.png", f"TRM ablation on {args.size}x{args.size} Sudoku, "
             f"{budget_text} each ({args.train} training puzzles)")
        for name, r in results["variants"].items():
            print(f"{name:>13}: test exact {r['test_exact']:.1%} ({r['steps']} steps, best val "
                  f"{r['best_val']['val_exact']:.1%} at step {r['best_val']['step']})", file=sys.stderr)
        print(f"wrote {root / 'results.json'} and {root / 'demo.png'} in {results['wall_s']} s", file=sys.stderr)

    run_cli(go)


if __name__ == "__main__":
    main()
