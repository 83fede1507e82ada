"""TRM data parallelism (trm/train.py): 2 processes of 4 slots train as 1 process of 8.

trm.train has one parallel mode, plain data parallelism (every rank a whole replica, gradients summed
before each step); it has no DeepSpeed/ZeRO, so that is what is tested. `--batch-size` is per
process: the global batch is world * batch_size, and the control run has 8 slots in one process.

What must be equal, and why it can be. Each step every halted slot takes a new example. The ranks'
slots are one batch in rank order, refilled from one stream of examples, one augmentation seed per
draw and one exploration generator, all the same on every rank (each rank keeps its share), so
rank r's slot i holds what the single process's slot r * 4 + i holds: the same examples, the same
augmented tokens, the same minimum step counts. Those are compared exactly, and so are the
per-step counts (refilled, halted, exact accuracy by supervision step): halting is decided per
slot by the sign of its halting logit, which fp32 rounding could only flip if a logit were within
~1e-7 of 0 (the logits start at -5 here). What cannot be bitwise equal is arithmetic: a rank's loss
is the mean of 4 slots, the gradient is the sum of two ranks' halves (gloo's all-reduce), and fp32
addition is not associative. Losses and gradient norms agree to 1e-6 relative (measured 9e-8), the
weights and the EMA to 1e-5 of each tensor's largest entry (measured 1.8e-6 after 6 AdamW steps:
Adam divides by sqrt(v), so a weight whose gradient is near 0, the halting head's at first, turns
rounding noise into a visible step).

The halted slots split evenly between the two ranks in the 2-process run (every example takes all
n_sup steps at this stage of training), so uneven splits, one rank refilling 1 slot while the other
refills 3, are tested in one process: two carries refilled with their share against one carry.

Resume: the 2-process run stopped after its step-3 checkpoint and relaunched continues to the same
records and bitwise the same weights as the run that was not stopped; a checkpoint written by 2
processes is refused by 1.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from launch.checkpoint.store import latest, load
from moe.config import ConfigError
from trm.data import build
from trm.run_config import parse
from trm.supervision import refill
from trm.train import Trainer, run

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import torchrun  # noqa: E402

TINY = "{hidden_size: 32, intermediate_size: 64, num_heads: 2, T: 2, n: 2, n_sup: 3, halt_exploration: 0.5}"
TASK = "{size: 4, train: 60, val: 16, test: 16}"
LOSS_RTOL, WEIGHTS_TOL = 1e-6, 1e-5


def _flags(out: Path, batch: int, *extra: str) -> list[str]:
    return ["--task-args", TASK, "--model", TINY, "--batch-size", str(batch), "--steps", "6", "--eval-every", "6",
            "--log-every", "1", "--checkpoint-every", "3", "--keep-checkpoints", "0", "--lr", "1e-3",
            "--warmup-steps", "2", "--device", "cpu", "--tensorboard", "false", "--out-dir", str(out), *extra]


def _records(out: Path) -> list[dict]:
    """Training records (evaluations are rank 0's alone and equal by construction of the weights)."""
    return [{k: v for k, v in json.loads(line).items() if k != "train_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines() if "loss" in json.loads(line)]


def _state(out: Path, rank: int) -> dict:
    return load(Path(latest(out / "checkpoints")), rank=rank)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trm-dp")
    one, two, resumed = root / "one", root / "two", root / "resumed"
    run(parse(_flags(one, 8)))
    torchrun(["-m", "trm.train", *_flags(two, 4)], nproc=2, timeout=300)
    # A crash after the step-3 checkpoint: the run directory as it was, less the newer checkpoint.
    shutil.copytree(two, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000006")
    (resumed / "checkpoints" / "latest").write_text("step_00000003")
    torchrun(["-m", "trm.train", "--resume", "--out-dir", str(resumed)], nproc=2, timeout=300)
    return one, two, resumed


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.distributed
def test_two_processes_log_what_one_process_with_their_slots_logs(runs):
    one, two, _ = runs
    ref, dp = _records(one), _records(two)
    assert [r["step"] for r in dp] == [r["step"] for r in ref] == list(range(1, 7))
    for a, b in zip(dp, ref):
        for key in ("refilled", "halted", "exact", "exact_by_slot_step"):  # counts: exactly equal
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
        for key in ("loss", "cell_loss", "q_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= LOSS_RTOL * abs(b[key]), (a["step"], key, a[key], b[key])
    assert [r["refilled"] for r in dp] == [8, 0, 0, 8, 0, 0]  # every slot refilled at steps 1 and 4


@pytest.mark.distributed
def test_two_processes_hold_one_process_batch_and_end_with_its_weights(runs):
    one, two, _ = runs
    ref, ranks = _state(one, 0), [_state(two, r) for r in range(2)]
    for name in ("examples_B", "inputs_BL", "targets_BL", "min_steps_B", "steps_B", "halted_B"):
        assert torch.equal(torch.cat([s["carry"][name] for s in ranks]), ref["carry"][name]), name
    for name in ("y_BLD", "z_BLD"):
        assert _relative(torch.cat([s["carry"][name] for s in ranks]), ref["carry"][name]) <= WEIGHTS_TOL, name
    for part in ("model", "ema"):
        for key, want in ref[part].items():
            assert torch.equal(ranks[0][part][key], ranks[1][part][key]), (part, key)  # the replicas agree
            assert _relative(ranks[0][part][key], want) <= WEIGHTS_TOL, (part, key)
    assert ranks[0]["stream"] == ref["stream"] and ranks[0]["draws"] == ref["draws"] == 16


@pytest.mark.distributed
def test_a_two_process_run_resumed_from_its_checkpoint_continues_exactly(runs):
    _, two, resumed = runs
    assert _records(resumed) == _records(two)
    history = [json.loads(line) for line in (resumed / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["start_step"] == 3
    for rank in range(2):
        a, b = _state(two, rank), _state(resumed, rank)
        for part in ("model", "ema"):
            assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), (rank, part)
        assert all(torch.equal(a["carry"][k], b["carry"][k]) for k in a["carry"]), rank


@pytest.mark.distributed
def test_one_process_refuses_a_two_process_checkpoint(runs, tmp_path):
    _, two, _ = runs
    copy = tmp_path / "copy"
    shutil.copytree(two, copy)
    with pytest.raises(ConfigError, match="written by 2 processes and this run has 1"):
        run(parse(["--resume", "--out-dir", str(copy), "--steps", "9"]))


def test_carries_refilled_with_their_share_draw_what_one_carry_draws(tmp_path):
    """Two 3-slot carries, refilled in rank order with uneven halting (0..3 halted slots each), against
    one 6-slot carry: every slot holds the same example, tokens and exploration minimum."""
    data = build("sudoku", {"size": 4, "train": 60, "val": 16, "test": 16}, seed=0)
    one = Trainer(parse(_flags(tmp_path / "a", 6)), data, None, torch.device("cpu"))
    parts = [Trainer(parse(_flags(tmp_path / "b", 3)), data, None, torch.device("cpu")) for _ in range(2)]
    masks = torch.Generator().manual_seed(0)
    for round_ in range(12):
        if round_:  # the first round refills every slot; then a random subset, often uneven, sometimes none
            halted = torch.rand(6, generator=masks) < 0.4
            one.carry.halted_B = halted.clone()
            for r, t in enumerate(parts):
                t.carry.halted_B = halted[3 * r : 3 * r + 3].clone()
        counts = [int(t.carry.halted_B.sum()) for t in parts]
        total = sum(counts)
        assert refill(one.model, one.carry, lambda k: one.draw(k, 0, k), one.generator) == total
        for r, t in enumerate(parts):
            before = sum(counts[:r])
            refill(t.model, t.carry, lambda k, t=t, before=before: t.draw(k, before, total), t.generator, before,
                   total)
        for name in ("examples_B", "inputs_BL", "targets_BL", "min_steps_B", "steps_B", "halted_B", "y_BLD"):
            got = torch.cat([getattr(t.carry, name) for t in parts])
            assert torch.equal(got, getattr(one.carry, name)), (round_, name)
        for t in parts:
            t.carry.steps_B += 1  # so a slot refilled later is told apart from one left alone
        one.carry.steps_B += 1
        assert all(t.draws == one.draws and t.stream.state_dict() == one.stream.state_dict() for t in parts)
    assert one.draws > 6 and (one.carry.min_steps_B > 1).any()  # refills happened, exploration drew minimums
