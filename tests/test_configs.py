"""The example configs in configs/: each loads through the real config loader and resolves to a valid
model and optimizer (no training), says how to run it, and default.yaml is the default run."""

import dataclasses
from dataclasses import fields
from pathlib import Path

import pytest
import yaml

import optim
from launch.config.training import TrainConfig, parse_args
from launch.config.warnings import warnings_for
from launch.data.build import DataConfig
from moe.config import from_dict

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
EXAMPLES = sorted(CONFIGS.glob("*.yaml"))


def test_the_examples_are_there():
    assert [p.name for p in EXAMPLES] == ["default.yaml", "k2-2b-1gpu.yaml", "muonclip.yaml", "node-8gpu-ep.yaml"]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_resolves_to_a_valid_model_and_optimizer(path):
    cfg = parse_args(["--config", str(path)])
    # The BPE gives at most data.vocab_size tokens; the model must hold them within its max_seq_len.
    model = cfg.model_config(vocab_size=cfg.data.vocab_size)
    optim.check(cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay, **cfg.optimizer_args)
    # What the trainer writes to <out_dir>/config.yaml is itself a valid config of the same model.
    saved = from_dict(TrainConfig, {**cfg.to_dict(), "resolved_model": dataclasses.asdict(model)})
    assert saved.model_config(vocab_size=cfg.data.vocab_size) == model
    if cfg.ep_size > 1:
        assert model.num_experts % cfg.ep_size == 0
        assert cfg.zero_stage in (1, 2)  # EP works with ZeRO 1 and 2 (docs/operators.md)
    assert warnings_for(cfg) == []  # an example does what it says


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_header_gives_the_command_that_runs_it(path):
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    # The command line itself (a torchrun one may continue on the next line).
    assert any("-m launch.train" in line and f"--config configs/{path.name}" in line for line in header), header


def test_examples_set_what_their_names_say():
    k2 = parse_args(["--config", str(CONFIGS / "k2-2b-1gpu.yaml")])
    assert (k2.model["preset"], k2.optimizer, k2.ep_size, k2.seq_len) == ("k2-2b", "muonclip", 1, 4096)
    assert k2.data.vocab_size == k2.model_config(vocab_size=None).vocab_size  # the preset's vocabulary
    node = parse_args(["--config", str(CONFIGS / "node-8gpu-ep.yaml")])
    assert (node.model["preset"], node.ep_size, node.zero_stage) == ("k2-2b", 8, 1)
    clip = parse_args(["--config", str(CONFIGS / "muonclip.yaml")])
    assert (clip.optimizer, clip.device, clip.model["preset"]) == ("muonclip", "cpu", "small")


def test_default_yaml_is_the_default_run():
    assert parse_args(["--config", str(CONFIGS / "default.yaml")]) == parse_args([])
    # It writes the fields out, so that changing a default means changing it too.
    values = yaml.safe_load((CONFIGS / "default.yaml").read_text())
    assert {"lr", "steps", "optimizer", "warmup_steps", "micro_batch_size", "seq_len"} <= set(values)
    assert set(values["data"]) == {f.name for f in fields(DataConfig)}
