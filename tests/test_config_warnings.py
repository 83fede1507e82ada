"""Warnings for settings that are valid but silently do less than asked: each names the field and its
value; the default run (and SFT's) has none; the trainer prints them on stderr."""

import re

import pytest

from launch.config.training import parse_args
from launch.config.warnings import warnings_for
from launch.data.build import build_data
from launch.train import run
from posttrain import sft


def _corpus(tmp_path):
    """A few kB of text: far too little for a BPE of 4096."""
    path = tmp_path / "small.txt"
    path.write_text("\n\n".join(f"note {i}: the cat sat on the mat and looked at the hat." for i in range(60)) + "\n")
    return str(path)


def test_the_default_run_and_sfts_have_none():
    assert warnings_for(parse_args([]), vocab_size=4096) == []
    assert warnings_for(parse_args([])) == []
    assert warnings_for(sft.parse(["--init-from", "runs/base", "--data", "chats.jsonl"]), vocab_size=400) == []


def test_a_bpe_smaller_than_asked_names_both_sizes_and_why(tmp_path):
    flags = ["--data", _corpus(tmp_path), "--data.cache_dir", str(tmp_path / "cache"), "--seq-len", "8"]
    cfg = parse_args(flags)
    built = build_data(cfg.data, cfg.seq_len).vocab_size
    assert 265 <= built < 1000  # 256 bytes + 9 special tokens + the few merges this text has
    (warning,) = warnings_for(cfg, built)
    assert warning.startswith(f"data.vocab_size = 4096 was asked, but the BPE trained on data.path = "
                              f"{cfg.data.path!r} has {built} tokens: the corpus is too small for more merges")
    # Asking for what the corpus holds silences it; the built size is exactly what was asked.
    again = parse_args([*flags, "--data.vocab_size", str(built)])
    assert build_data(again.data, again.seq_len).vocab_size == built
    assert warnings_for(again, built) == []
    # A tokenizer that is not trained here, or one as large as asked, gives no such warning.
    assert warnings_for(cfg, 4096) == [] and warnings_for(cfg, None) == []
    assert warnings_for(parse_args([*flags, "--init-from", "runs/base"]), built) == []


SHORT = ["--eval-every", "10", "--checkpoint-every", "10"]  # cadences that fit in 20 steps


@pytest.mark.parametrize("flags, expected", [
    (["--steps", "20", "--warmup-steps", "20", *SHORT],
     "warmup_steps = 20 >= steps = 20: the lr rises for the whole run, reaches lr = 0.003 only at the last step "
     "and never decays"),
    (["--steps", "20", "--warmup-steps", "30", *SHORT],
     "warmup_steps = 30 >= steps = 20: the lr rises for the whole run, reaches 20/30 of lr = 0.003 only at the "
     "last step"),
    (["--steps", "40", "--checkpoint-every", "20"], "eval_every = 50 > steps = 40: the run validates only before its first step and after its last"),
    (["--checkpoint-every", "500"], "checkpoint_every = 500 > steps = 200: the only checkpoint is the one at the end"),
    (["--log-every", "201"], "log_every = 201 > steps = 200: metrics.jsonl records only the validations"),
    (["--data.tokenizer", "bytes", "--data.vocab_size", "8192"],
     "data.vocab_size = 8192 is ignored: data.tokenizer = 'bytes' has a fixed vocabulary of 257"),
    (["--init-from", "runs/base", "--data.vocab_size", "8192"],
     "data.vocab_size = 8192 is ignored: a run with init_from uses the tokenizer of 'runs/base'"),
    (["--data", "corpus/", "--data.max_bytes", "1000"],
     "data.max_bytes = 1000 is ignored: it caps only the default corpus, and data.path = 'corpus/' is given"),
    (["--zero-stage", "2"], "zero_stage = 2 is ignored: one process trains without DeepSpeed"),
    (["--deepspeed-config", "ds.json"], "deepspeed_config = 'ds.json' is ignored: one process trains without DeepSpeed"),
])
def test_each_silent_no_op_is_named(flags, expected, monkeypatch):
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    found = warnings_for(parse_args(flags), vocab_size=4096)
    assert len(found) == 1 and found[0].startswith(expected), found


def test_zero_stage_under_a_launcher_is_no_warning(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "8")
    assert warnings_for(parse_args(["--zero-stage", "2", "--deepspeed-config", "ds.json"])) == []


def test_the_trainer_prints_them_once_on_stderr(tmp_path, capsys):
    cfg = parse_args(["--model", "tiny", "--data", _corpus(tmp_path), "--data.cache_dir", str(tmp_path / "cache"),
                      "--seq-len", "8", "--micro-batch-size", "2", "--steps", "2", "--warmup-steps", "1",
                      "--eval-every", "1", "--eval-batches", "1", "--checkpoint-every", "0",
                      "--out-dir", str(tmp_path / "run")])
    run(cfg)
    warnings = re.findall(r"^warning: .*$", capsys.readouterr().err, re.M)
    assert len(warnings) == 1 and warnings[0].startswith("warning: data.vocab_size = 4096 was asked"), warnings
