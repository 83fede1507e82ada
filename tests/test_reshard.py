"""Checkpoints resumed on another layout (number of processes, EP size, ZeRO stage): the steps after
the resume have the losses of the run that went on in its own layout (weights, optimizer state, data
position and schedule all carried over), and each rank writes about 1/N of a checkpoint's bytes.

Layouts: 2 processes EP 2 ZeRO-2 (Muon) -> 1 process, -> 4 processes (EP 2 x DP 2, ZeRO-1), -> 2
processes EP 1 ZeRO-1; 1 process (AdamW) -> 2 processes EP 2 ZeRO-1, and ZeRO-3; 2 processes ZeRO-3 (AdamW) ->
the same, and 2 processes EP 2 ZeRO-2. Every layout has the global batch 8 = micro_batch_size x grad_accum x world size.
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from launch.checkpoint import store as checkpoint
from launch.config.training import parse_args
from launch.train import run

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import tiny_train_flags, torchrun  # noqa: E402

ONE = ("--grad-accum", "2")  # one process
TWO = ("--grad-accum", "1")  # two processes


def flags(tmp, out, *extra):
    return [*tiny_train_flags(tmp, out), "--steps", "6", "--warmup-steps", "2", "--checkpoint-every", "2",
            "--keep-checkpoints", "0", "--eval-every", "100", "--eval-batches", "1", "--device", "cpu",
            "--dist-timeout-s", "120", *extra]


def train(tmp, out, nproc, *extra):
    if nproc == 1:
        run(parse_args(flags(tmp, out, *extra)))
    else:
        torchrun(["-m", "launch.train", *flags(tmp, out, *extra)], nproc=nproc, timeout=400)


def losses(out):
    return {r["step"]: r["lm_loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "lm_loss" in r}


def cut_to(run_dir, dest, step):
    """A copy of the finished run as if it had been killed right after checkpoint `step`."""
    shutil.copytree(run_dir, dest)
    for ckpt in (dest / "checkpoints").glob("step_*"):
        if int(ckpt.name.removeprefix("step_")) > step:
            shutil.rmtree(ckpt)
    (dest / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    return dest


def assert_same_continuation(original, resumed):
    ref, got = losses(original), losses(resumed)
    assert sorted(got) == list(range(1, 7))
    # Step 5: the restored weights on the same tokens; step 6: after an update from the restored
    # optimizer state. Only the summation order differs between layouts.
    worst = max(abs(got[s] - ref[s]) / ref[s] for s in (5, 6))
    assert worst <= 1e-6, (ref, got)


def tensor_bytes(ckpt: Path) -> list[int]:
    """Each rank's safetensors file size (its JSON holds the scheduler, data position and RNG, ~17 kB)."""
    manifest = checkpoint.read_manifest(ckpt)
    sizes = {e["file"]: e["bytes"] for e in manifest["files"]}
    return [sizes[f"rank{r:05d}.safetensors"] for r in range(manifest["world_size"])]


@pytest.fixture(scope="module")
def ep2_muon(tmp_path_factory):
    """Two processes, EP 2, ZeRO-2, Muon: the run the resumes below are compared with."""
    tmp = tmp_path_factory.mktemp("ep2")
    train(tmp, tmp / "run", 2, *TWO, "--ep-size", "2", "--zero-stage", "2", "--optimizer", "muon")
    return tmp, tmp / "run"


@pytest.mark.distributed
def test_two_process_ep_checkpoint_resumes_in_one_process(ep2_muon, tmp_path):
    tmp, original = ep2_muon
    resumed = cut_to(original, tmp_path / "one", 4)
    train(tmp, resumed, 1, *ONE, "--ep-size", "1", "--optimizer", "muon", "--resume")
    assert_same_continuation(original, resumed)
    manifest = checkpoint.read_manifest(resumed / "checkpoints" / "step_00000006")
    assert manifest["world_size"] == 1 and manifest["ep_size"] == 1
    # The same state (Muon, step 6) on 1 and on 2 processes: each of the two writes about half of it.
    whole = tensor_bytes(resumed / "checkpoints" / "step_00000006")
    halves = tensor_bytes(original / "checkpoints" / "step_00000006")
    assert max(halves) <= 1.1 * whole[0] / 2 and sum(halves) <= 1.02 * whole[0], (whole, halves)


@pytest.mark.distributed
def test_two_process_checkpoint_resumes_on_four_with_dp_and_ep(ep2_muon, tmp_path):
    """World 4 = 2 data-parallel x 2 expert-parallel; each rank writes about a quarter."""
    tmp, original = ep2_muon
    resumed = cut_to(original, tmp_path / "four", 4)
    train(tmp, resumed, 4, "--micro-batch-size", "2", *TWO, "--ep-size", "2", "--zero-stage", "1",
          "--optimizer", "muon", "--resume")
    assert_same_continuation(original, resumed)
    halves = tensor_bytes(original / "checkpoints" / "step_00000006")
    quarters = tensor_bytes(resumed / "checkpoints" / "step_00000006")
    assert len(quarters) == 4 and max(quarters) <= 1.1 * sum(halves) / 4, (halves, quarters)


@pytest.mark.distributed
def test_one_process_checkpoint_resumes_on_two_with_ep_and_zero1_and_with_zero3(tmp_path):
    original = tmp_path / "one"
    train(tmp_path, original, 1, *ONE)  # AdamW
    resumed = cut_to(original, tmp_path / "two", 4)
    train(tmp_path, resumed, 2, *TWO, "--ep-size", "2", "--zero-stage", "1", "--resume")
    assert_same_continuation(original, resumed)
    into_zero3 = cut_to(original, tmp_path / "zero3", 4)
    train(tmp_path, into_zero3, 2, *TWO, "--zero-stage", "3", "--resume")
    assert_same_continuation(original, into_zero3)


@pytest.mark.distributed
def test_ep2_checkpoint_resumes_at_ep1_and_another_zero_stage(ep2_muon, tmp_path):
    tmp, original = ep2_muon
    resumed = cut_to(original, tmp_path / "ep1", 4)
    train(tmp, resumed, 2, *TWO, "--ep-size", "1", "--zero-stage", "1", "--optimizer", "muon", "--resume")
    assert_same_continuation(original, resumed)


@pytest.mark.distributed
def test_zero3_checkpoint_resumes_under_zero3_and_at_ep2_under_zero2(tmp_path):
    """World 2 EP 1 ZeRO-3 -> the same, and -> world 2 EP 2 ZeRO-2; AdamW, as ZeRO-3 takes no Muon."""
    original = tmp_path / "zero3"
    train(tmp_path, original, 2, *TWO, "--zero-stage", "3")
    again = cut_to(original, tmp_path / "again", 4)
    train(tmp_path, again, 2, *TWO, "--zero-stage", "3", "--resume")
    assert_same_continuation(original, again)
    resumed = cut_to(original, tmp_path / "zero2", 4)
    train(tmp_path, resumed, 2, *TWO, "--ep-size", "2", "--zero-stage", "2", "--resume")
    assert_same_continuation(original, resumed)


@pytest.mark.distributed
def test_export_of_a_two_process_ep_checkpoint_gives_the_runs_validation_loss(ep2_muon):
    """The consolidated single-device model, evaluated in one process, has the loss the EP run logged."""
    from launch.data.build import ValBatches, build_data
    from launch.export import consolidate
    from launch.train import evaluate

    tmp, original = ep2_muon
    cfg = parse_args(flags(tmp, original))
    data = build_data(cfg.data, cfg.seq_len)
    model = consolidate(original / "checkpoints" / "step_00000006")
    val = evaluate(model, ValBatches(data.val, cfg.micro_batch_size, cfg.eval_batches), torch.device("cpu"))
    logged = json.loads((original / "summary.json").read_text())["final_val_loss"]
    assert abs(val - logged) / logged <= 1e-6, (val, logged)


def assert_continues(original, resumed, steps):
    ref, got = losses(original), losses(resumed)
    worst = max(abs(got[s] - ref[s]) / ref[s] for s in steps)
    assert worst <= 1e-6, (steps, ref, got)


@pytest.mark.distributed
def test_resume_into_and_out_of_pipeline_stages(tmp_path):
    """(DP 2, EP 2, PP 1) -> (DP 1, EP 1, PP 2) -> (DP 2, EP 2, PP 1) again, and -> one process, AdamW
    ZeRO-1, global batch 8 throughout (Muon under PP needs stages with the same kinds of blocks, which
    tiny's dense first layer and MoE second do not give): each resumed run's next losses equal the original run's. The
    checkpoint of the middle run is written by pipeline stages, each saving only its own layers."""
    eight = ("--steps", "8", "--zero-stage", "1")
    original = tmp_path / "ep2"
    train(tmp_path, original, 2, *TWO, "--ep-size", "2", *eight)
    piped = cut_to(original, tmp_path / "pp2", 4)
    train(tmp_path, piped, 2, "--grad-accum", "2", "--ep-size", "1", "--pp-size", "2", *eight, "--resume")
    assert_continues(original, piped, (5, 6, 7, 8))
    stage_bytes = tensor_bytes(piped / "checkpoints" / "step_00000006")
    assert len(stage_bytes) == 2 and max(stage_bytes) < 0.8 * sum(stage_bytes), stage_bytes  # each its own stage
    back = cut_to(piped, tmp_path / "back", 6)
    train(tmp_path, back, 2, *TWO, "--ep-size", "2", "--pp-size", "1", *eight, "--resume")
    assert_continues(original, back, (7, 8))
    one = cut_to(piped, tmp_path / "one", 6)
    train(tmp_path, one, 1, *ONE, "--ep-size", "1", "--pp-size", "1", *eight, "--resume")
    assert_continues(original, one, (7, 8))
