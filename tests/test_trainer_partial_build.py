"""launch.train under expert parallelism builds the model on the meta device and allocates only this
rank's slice of the experts (moe/model.py's materialize). Reference: the one-process trainer on the
same data, which builds the whole model the ordinary way. The two must start from the same weights,
so every step's loss agrees, and the largest rank must hold less than the whole model."""

import json
import sys
from pathlib import Path

import pytest
import torch

from launch.config.training import parse_args
from launch.train import run
from moe.config import preset
from moe.model import Transformer
from moe.moe import RoutedExperts

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import tiny_train_flags, torchrun  # noqa: E402


def _flags(tmp, out, *extra):
    return [*tiny_train_flags(tmp, out), "--steps", "3", "--warmup-steps", "1", "--eval-every", "3",
            "--eval-batches", "1", "--device", "cpu", "--dist-timeout-s", "120", *extra]


def _summary_and_losses(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), {r["step"]: r["lm_loss"] for r in records if "lm_loss" in r}


@pytest.mark.distributed
def test_expert_parallel_trainer_starts_from_the_one_process_model_and_holds_its_slice(tmp_path):
    run(parse_args(_flags(tmp_path, tmp_path / "one", "--grad-accum", "2")))
    torchrun(["-m", "launch.train", *_flags(tmp_path, tmp_path / "ep", "--grad-accum", "1", "--ep-size", "2",
                                           "--zero-stage", "1")], nproc=2, timeout=400)
    (one, ref), (ep, got) = _summary_and_losses(tmp_path / "one"), _summary_and_losses(tmp_path / "ep")
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    # Same weights and tokens; only the summation order differs (measured in tests/test_reshard.py's layouts).
    assert max(abs(got[s] - ref[s]) / ref[s] for s in ref) <= 1e-6, (ref, got)
    assert one["params_largest_rank"] == one["params_total"] == ep["params_total"]
    # What a rank of EP 2 must hold: the whole tiny model but half of each MoE block's routed experts.
    with torch.device("meta"):
        whole = Transformer(preset("tiny", vocab_size=one["vocab_size"]))
    routed = sum(p.numel() for m in whole.modules() if isinstance(m, RoutedExperts) for p in m.parameters())
    assert sum(p.numel() for p in whole.parameters()) == one["params_total"] and routed > 0
    assert ep["params_largest_rank"] == one["params_total"] - routed // 2
