"""The RL trainer end to end (posttrain/rl/train.py): a run from a fine-tuned tiny model, its metrics,
checkpoints and exact resume with partial rollouts in flight, and 2 processes against 1.

The fixture fine-tunes the tiny preset briefly on digit reversal, so its samples end (<|im_end|>)
at different lengths; the length penalty then gives samples of one prompt different rewards, hence
a non-zero gradient, even while no answer is right yet.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from launch.checkpoint.pretrained import load_pretrained
from launch.train import run as train_run
from moe.config import ConfigError
from posttrain import sft
from posttrain.rl.tasks import arithmetic, digits
from posttrain.rl.config import parse
from posttrain.rl.train import run

DIST = Path(__file__).parent / "dist"
sys.path.insert(0, str(DIST))
from harness import tiny_chat_base_flags, torchrun  # noqa: E402


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    train_run(sft.parse_args(tiny_chat_base_flags(root, root / "base")))
    arithmetic.write_jsonl(digits.sft_records(digits.make_problems(600, 0, digits=[2, 3]), 0), root / "sft.jsonl")
    train_run(sft.parse(["--init-from", str(root / "base"), "--data", str(root / "sft.jsonl"), "--steps", "30",
                         "--lr", "3e-3", "--seq-len", "128", "--eval-every", "30", "--eval-batches", "1",
                         "--out-dir", str(root / "sft")]))
    return root


def _flags(root: Path, out: Path, *extra: str) -> list[str]:
    return ["--init-from", str(root / "sft"), "--task", "reverse", "--task-args", "{digits: [2, 3]}",
            "--train-problems", "64", "--eval-problems", "16", "--prompts-per-iteration", "4",
            "--samples-per-prompt", "4", "--max-response-tokens", "24", "--length-penalty", "0.5",
            "--micro-batch-groups", "2", "--eval-every", "2", "--out-dir", str(out), *extra]


def _records(out: Path) -> list[dict]:
    timing = ("sample_s", "train_s")
    return [{k: v for k, v in json.loads(line).items() if k not in timing}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(out: Path) -> dict:
    return load_pretrained(str(out)).model.state_dict()


def test_rl_learns_something_logs_it_and_resumes_exactly_with_partial_rollouts(policy, tmp_path):
    flags = ["--partial-rollout-tokens", "10", "--checkpoint-every", "2", "--iterations", "4"]
    whole = tmp_path / "whole"
    summary = run(parse(_flags(policy, whole, *flags)))
    records = _records(whole)
    assert [r["iteration"] for r in records] == [0, 1, 2, 3, 4]
    trained = [r for r in records[1:] if r.get("groups_trained")]
    assert trained and all(r["waiting"] >= 0 for r in records[1:])
    assert any(r["waiting"] > 0 for r in records[1:])  # partial rollouts were in flight across iterations
    for key in ("reward", "accuracy", "response_tokens", "kl", "mismatch", "mismatch_without_replay", "grad_norm"):
        assert all(key in r for r in trained), key
    assert max(r["mismatch"] for r in trained) < 1e-4  # fp32 CPU: sampling and training agree, with replay
    assert "heldout_accuracy" in records[0] and "heldout_accuracy" in records[-1]
    assert summary["final_heldout"]["heldout_accuracy"] == records[-1]["heldout_accuracy"]
    start, end = load_pretrained(str(policy / "sft")).model.state_dict(), _weights(whole)
    assert max((start[k] - end[k]).abs().max().item() for k in start) > 1e-4  # the policy moved
    assert (whole / "rl.png").stat().st_size > 10_000
    # Stop after 2 iterations, resume to 4: the same samples, metrics and weights as uninterrupted.
    cut = tmp_path / "cut"
    run(parse(_flags(policy, cut, *flags[:-2], "--iterations", "2")))
    run(parse(["--resume", "--out-dir", str(cut), "--iterations", "4"]))
    assert _records(cut) == records
    resumed = _weights(cut)
    assert all(torch.equal(resumed[k], end[k]) for k in end)


def test_bad_settings_are_refused_before_any_work(policy, tmp_path):
    with pytest.raises(ConfigError, match="init_from is required"):
        parse(["--out-dir", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="objective = 'ppo'"):
        run(parse(_flags(policy, tmp_path / "a", "--objective", "ppo")))
    with pytest.raises(ConfigError, match="partial_rollout_tokens = 24"):
        parse(_flags(policy, tmp_path / "b", "--partial-rollout-tokens", "24"))
    with pytest.raises(ConfigError, match="task_args.digitz"):
        run(parse(_flags(policy, tmp_path / "c", "--task-args", "{digitz: [2]}")))
    with pytest.raises(ConfigError, match="max_seq_len"):
        run(parse(_flags(policy, tmp_path / "d", "--max-response-tokens", "5000", "--iterations", "1")))
    done = tmp_path / "done"
    run(parse(_flags(policy, done, "--iterations", "1")))
    with pytest.raises(ConfigError, match="objective: the run has 'k15'"):
        run(parse(["--resume", "--out-dir", str(done), "--iterations", "2", "--objective", "grpo"]))
    with pytest.raises(ConfigError, match="already holds files"):
        run(parse(_flags(policy, done, "--iterations", "1")))


@pytest.mark.distributed
def test_two_processes_train_what_one_process_trains(policy, tmp_path):
    # grpo, plain AdamW-free Muon path: muonclip at the default tau never clips this model, so every
    # step is the same maths on both layouts; only the gradient sum's rounding differs.
    flags = ["--iterations", "2", "--objective", "grpo", "--checkpoint-every", "0"]
    one = tmp_path / "one"
    run(parse(_flags(policy, one, *flags)))
    two = tmp_path / "two"
    # Counting the SHA-256s each rank takes of the source's files (tests/dist/digest_count.py).
    counts = tmp_path / "counts"
    torchrun([str(DIST / "digest_count.py"), str(policy / "sft"), str(counts), "posttrain.rl",
              *_flags(policy, two, *flags)], nproc=2, timeout=300)
    # Rank 0 alone checks the source; the other rank reads the checkpoint it chose.
    hashed = (counts / "rank0.txt").read_text().split()
    assert hashed and len(hashed) == len(set(hashed)) and not (counts / "rank1.txt").read_text()  # each file once
    a, b = _records(one), _records(two)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in ("reward", "accuracy", "response_tokens", "groups_trained", "heldout_accuracy"):
            assert x.get(key) == y.get(key), key
        for key in ("kl", "loss", "grad_norm"):
            if key in x:
                assert abs(x[key] - y[key]) <= 1e-5 * max(1.0, abs(x[key])), (key, x[key], y[key])
    wa, wb = _weights(one), _weights(two)
    scale = max(v.abs().max().item() for v in wa.values())
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5 * scale


def test_config_reads_files_and_flags_and_help_gives_each_fields_doc_and_default(tmp_path, capsys):
    path = tmp_path / "rl.yaml"
    path.write_text("init_from: some/run\nobjective: grpo\nobjective_args: {clip_eps: 0.1}\nlr: 1e-4\n")
    cfg = parse(["--config", str(path), "--lr", "5e-5", "--routing-replay", "false"])
    assert (cfg.init_from, cfg.objective, cfg.objective_args, cfg.lr, cfg.routing_replay) == \
        ("some/run", "grpo", {"clip_eps": 0.1}, 5e-5, False)
    assert cfg.temperature_at(0) == 1.0
    decaying = parse(["--init-from", "x", "--iterations", "5", "--final-temperature", "0.6"])
    assert [round(decaying.temperature_at(i), 3) for i in range(5)] == [1.0, 0.9, 0.8, 0.7, 0.6]
    path.write_text("init_from: x\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        parse(["--config", str(path)])
    with pytest.raises(ConfigError, match="temperature = 0.0"):
        parse(["--init-from", "x", "--temperature", "0"])
    with pytest.raises(SystemExit):
        parse(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "responses sampled per prompt (k) (default: 8)" in text and "--lr FLOAT" in text
