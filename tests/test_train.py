"""The single-process trainer: config resolution (file + flags), bad input, and a short real run."""

import json
import math
import sys
from pathlib import Path

import pytest
import yaml

from launch.config.training import TrainConfig, parse_args
from launch.train import lr_factor, run
from moe.config import ConfigError

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import tiny_train_flags  # noqa: E402


def tiny_args(tmp_path, *extra):
    return [*tiny_train_flags(tmp_path, tmp_path / "run", micro_batch_size=8), *extra]


def test_defaults_are_the_cpu_demo():
    cfg = parse_args([])
    assert cfg.model == {"preset": "small"} and cfg.data.path is None and cfg.optimizer == "adamw"
    assert cfg.model_config(vocab_size=4096).num_experts == 32


def test_file_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": {"preset": "tiny", "num_layers": 3}, "steps": 5, "lr": 1e-3}))
    cfg = parse_args(["--config", str(path), "--steps", "7", "--model.num_layers=4", "--data.vocab_size", "512"])
    assert (cfg.steps, cfg.lr, cfg.data.vocab_size) == (7, 1e-3, 512)
    assert cfg.model == {"preset": "tiny", "num_layers": 4}
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 9\noptimizer = "muon"\n[model]\npreset = "tiny"\n')
    cfg = parse_args(["--config", str(toml)])
    assert (cfg.steps, cfg.optimizer, cfg.model["preset"]) == (9, "muon", "tiny")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--steps", "abc"], ["steps", "'abc'"]),
        (["--steps", "0"], ["steps", "0"]),
        (["--model.num_experts_per_tok", "99"], ["num_experts_per_tok", "99", "num_experts"]),
        (["--model.bogus", "1"], ["bogus"]),
        (["--model", "huge"], ["huge", "tiny"]),
        (["--seq-len", "99999"], ["seq_len", "99999"]),
        (["--model.num_heads", "5", "--model.qk_nope_head_dim", "null"], ["num_heads", "5", "hidden_size"]),
    ],
)
def test_bad_flags_name_field_and_value(args, words):
    with pytest.raises(ConfigError) as err:
        parse_args(args)
    for word in words:
        assert word in str(err.value)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stpes: 5\n")
    with pytest.raises(ConfigError, match="'stpes'"):
        parse_args(["--config", str(path)])


def test_missing_data_path_stops_before_work(tmp_path):
    cfg = parse_args(tiny_args(tmp_path, "--data", str(tmp_path / "nope.txt")))
    with pytest.raises(ConfigError, match="nope.txt"):
        run(cfg)
    assert not (tmp_path / "run").exists()  # nothing was created for a run that could not start


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, cfg) == pytest.approx(0.1)


def test_short_run_learns_and_writes_outputs(tmp_path):
    cfg = parse_args(tiny_args(tmp_path, "--steps", "30", "--eval-every", "15", "--eval-batches", "2", "--warmup-steps", "3"))
    summary = run(cfg)
    out = tmp_path / "run"
    assert summary["final_val_loss"] < summary["first_val_loss"] - 0.5, summary
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "lm_loss" in r]
    assert len(steps) == 30
    for key in ("lr", "grad_norm", "tokens_per_s", "aux_loss", "router_max_over_mean"):
        assert key in steps[-1]
    assert len(steps[-1]["router_max_over_mean"]) == 1  # tiny has one MoE layer
    assert (out / "loss.png").stat().st_size > 1000
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["preset"] == "tiny" and saved["resolved_model"]["vocab_size"] == summary["vocab_size"]
    # A second run into the same directory must not overwrite the first one's files.
    with pytest.raises(ConfigError, match="already holds files"):
        run(parse_args(tiny_args(tmp_path, "--steps", "1")))
