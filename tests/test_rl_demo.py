"""The RL demo end to end at toy size: SFT a tiny run a few steps on reversal, RL with both
objectives, and write every promised file. (Whether RL lifts held-out accuracy as the README says
is a measurement at full size: README "RL on verifiable rewards".)"""

import json
import sys
from pathlib import Path

import pytest

from launch.train import run
from moe.config import ConfigError
from posttrain import sft
from posttrain.rl import demo

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import tiny_chat_base_flags  # noqa: E402

RL_TOY = ["--rl-arg=--prompts-per-iteration=2", "--rl-arg=--samples-per-prompt=2", "--rl-arg=--train-problems=20",
          "--rl-arg=--eval-problems=4", "--rl-arg=--max-response-tokens=16", "--rl-arg=--micro-batch-groups=1"]


def test_rl_demo_writes_its_runs_results_and_plot(tmp_path):
    run(sft.parse_args(tiny_chat_base_flags(tmp_path, tmp_path / "base")))
    out = tmp_path / "demo"
    results = demo.run(demo.build_parser().parse_args([
        "--out-dir", str(out), "--base", str(tmp_path / "base"), "--sft-steps", "3", "--sft-conversations", "60",
        "--iterations", "2", "--sft-arg=--micro-batch-size=2", "--sft-arg=--eval-batches=1", *RL_TOY]))
    for name in ("sft.jsonl", "results.json", "demo.png", "sft/summary.json", "rl-k15/summary.json",
                 "rl-k15/rl.png", "rl-grpo/metrics.jsonl"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "results.json").read_text())
    assert saved == results and set(saved["runs"]) == {"k15", "grpo"}
    for r in saved["runs"].values():
        assert 0 <= r["heldout_first"] <= 1 and 0 <= r["heldout_last"] <= 1
    # Both objectives start from the same SFT model: the same held-out score at iteration 0.
    assert saved["runs"]["k15"]["heldout_first"] == saved["runs"]["grpo"]["heldout_first"]
    with pytest.raises(ConfigError, match="exists"):
        demo.run(demo.build_parser().parse_args(["--out-dir", str(out), "--base", str(tmp_path / "base")]))
