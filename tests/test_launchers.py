"""The same entry point under the `deepspeed` launcher (torchrun is covered by the distributed tests)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch.config.training import parse_args

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import REPO, free_port, tiny_train_flags, torchrun  # noqa: E402


def test_local_rank_flag_from_the_deepspeed_launcher_is_accepted():
    assert parse_args(["--local_rank=1", "--steps", "3"]).steps == 3


@pytest.mark.distributed
def test_deepspeed_launcher_trains_two_processes(tmp_path):
    launcher = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    out = tmp_path / "run"
    cmd = [
        launcher, "--num_gpus", "2", "--master_port", str(free_port()), "--module", "launch.train",
        *tiny_train_flags(tmp_path, out), "--steps", "6", "--eval-every", "3", "--eval-batches", "2",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 6
    assert summary["final_val_loss"] < summary["first_val_loss"]
    assert (out / "deepspeed_config.json").is_file()



@pytest.mark.distributed
def test_zero3_with_adamw_trains_like_zero2(tmp_path):
    """ZeRO-3 shards the weights themselves; with AdamW it must give ZeRO-2's losses (same global batch)."""
    losses = {}
    for stage in (2, 3):
        out = tmp_path / f"zero{stage}"
        torchrun(["-m", "launch.train", *tiny_train_flags(tmp_path, out), "--steps", "5", "--eval-every", "5",
                  "--eval-batches", "2", "--zero-stage", str(stage)])
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[stage] = [r["lm_loss"] for r in records if "lm_loss" in r]
    assert len(losses[3]) == 5, losses
    # Same maths, different reduction order across shards: fp32 rounding only.
    assert max(abs(a - b) / b for a, b in zip(losses[2], losses[3])) < 1e-5, losses
    assert losses[3][-1] < losses[3][0]
