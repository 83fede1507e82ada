"""The tool-use demo end to end at toy size: from a tiny pretrained run, SFT a few steps, evaluate
before and after in the live loop, and write every promised file. (Whether SFT reaches the README's
success rates is a measurement at full size: README "Tool use after SFT".)"""

import json

import pytest

from launch.train import run
from posttrain import demo, sft
from moe.config import ConfigError


def test_demo_writes_its_runs_transcripts_results_and_plot(tmp_path):
    run(sft.parse_args(["--model", "tiny", "--data.vocab_size", "400", "--data.max_bytes", "300000",
                        "--data.cache_dir", str(tmp_path / "cache"), "--seq-len", "64", "--micro-batch-size", "8",
                        "--steps", "4", "--eval-every", "4", "--eval-batches", "1", "--out-dir", str(tmp_path / "base")]))
    out = tmp_path / "demo"
    results = demo.run(demo.build_parser().parse_args([
        "--out-dir", str(out), "--base", str(tmp_path / "base"), "--sft-steps", "3", "--train-tasks", "40",
        "--eval-tasks", "3", "--sft-arg=--seq-len=256", "--sft-arg=--micro-batch-size=2", "--sft-arg=--eval-batches=1"]))
    for name in ("traces.jsonl", "heldout.jsonl", "transcripts_before.jsonl", "transcripts_after.jsonl",
                 "results.json", "demo.png", "sft/summary.json", "sft/loss.png"):
        assert (out / name).is_file(), name
    assert len((out / "traces.jsonl").read_text().splitlines()) == 40
    transcripts = [json.loads(line) for line in (out / "transcripts_after.jsonl").read_text().splitlines()]
    assert len(transcripts) == 6 and all(t["messages"][0]["role"] == "user" for t in transcripts)
    saved = json.loads((out / "results.json").read_text())
    assert saved == results
    for stage in ("before", "after"):
        for kind in ("single", "multi"):
            assert saved[stage][kind]["tasks"] == 3 and 0 <= saved[stage][kind]["success_rate"] <= 1
    # The held-out requests are never among the trajectories trained on.
    trained = {json.loads(line)["messages"][0]["content"] for line in (out / "traces.jsonl").read_text().splitlines()}
    heldout = {json.loads(line)["messages"][0]["content"] for line in (out / "heldout.jsonl").read_text().splitlines()}
    assert not trained & heldout
    # Nothing a user saved is replaced: a second demo into the same directory stops before any work.
    with pytest.raises(ConfigError, match="exists"):
        demo.run(demo.build_parser().parse_args(["--out-dir", str(out), "--base", str(tmp_path / "base")]))
