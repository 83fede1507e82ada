"""What --resume accepts and refuses, and that a refusal touches nothing: the run directory is
compared file by file before and after every refused command."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import moe.model
from launch.checkpoint import run_dir
from launch.checkpoint import store as checkpoint
from launch.config.training import parse_args
from launch.train import TrainingFailed, main, run
from moe.config import ConfigError
from test_checkpoint_resume import args, losses

sys.path.insert(0, str(Path(__file__).parent / "dist"))
from harness import REPO, torchrun  # noqa: E402


def snapshot(out: Path) -> dict:
    """Every file under `out` (the lock file aside) and its digest."""
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(out.rglob("*")) if p.is_file() and p.name != run_dir.LOCK}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    run(parse_args(args(tmp, tmp / "run")))
    return tmp, tmp / "run"


def copy_of(finished, tmp_path, cut_to=None):
    """A copy of the finished run; with `cut_to`, as if killed after checkpoint `cut_to` (its later
    checkpoints gone, its metrics still holding the later steps)."""
    cache, full = finished
    out = tmp_path / "run"
    shutil.copytree(full, out)
    if cut_to is not None:
        for later in (out / "checkpoints").glob("step_*"):
            if int(later.name[5:13]) > cut_to:
                shutil.rmtree(later)
        (out / "checkpoints" / "latest").write_text(f"step_{cut_to:08d}\n")
    return cache, out


def refused(argv, match, out):
    before = snapshot(out)
    with pytest.raises((ConfigError, checkpoint.CheckpointError), match=match):
        run(parse_args(argv))
    assert snapshot(out) == before, "a refused resume changed the run directory"


def test_every_checkpoint_damaged_stops_and_touches_nothing(finished, tmp_path):
    cache, out = copy_of(finished, tmp_path)
    for ckpt in (out / "checkpoints").glob("step_*"):
        (ckpt / "rank00000.safetensors").write_bytes(b"junk")
    refused(args(cache, out, "--resume"), r"none of the 3 checkpoint\(s\).*step_00000006: .*step_00000002: ", out)


def test_changed_architecture_is_refused_with_both_values(finished, tmp_path):
    cache, out = copy_of(finished, tmp_path, cut_to=4)
    for flag, value, field in [("--model.rope_theta", "500000", "rope_theta"),
                               ("--model.routed_scaling_factor", "2.5", "routed_scaling_factor"),
                               ("--model.num_experts_per_tok", "1", "num_experts_per_tok"),
                               ("--model.score_func", "softmax", "score_func"),
                               ("--model.num_layers", "3", "num_layers")]:
        refused(args(cache, out, "--resume", flag, value), rf"model.{field}: the run has .*, this command gives", out)
    refused(args(cache, out, "--resume", "--optimizer", "muon"), "optimizer: the run has 'adamw', this command gives 'muon'", out)
    refused(args(cache, out, "--resume", "--weight-decay", "0.5"), "weight_decay: the run has 0.1", out)


def test_changed_lr_is_applied_logged_and_kept_in_history(finished, tmp_path):
    cache, out = copy_of(finished, tmp_path, cut_to=4)
    run(parse_args(args(cache, out, "--resume", "--lr", "1e-4", "--steps", "8")))
    from launch.train import lr_factor

    cfg = parse_args(args(cache, out, "--lr", "1e-4", "--steps", "8"))
    logged = losses(out, "lr")
    assert [logged[s] for s in (5, 6, 7, 8)] == pytest.approx([1e-4 * lr_factor(s - 1, cfg) for s in (5, 6, 7, 8)], rel=1e-12)
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 1e-4
    history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert [h["attempt"] for h in history] == [0, 1] and history[1]["start_step"] == 4
    assert history[1]["changed"] == {"lr": [0.003, 0.0001], "steps": [6, 8]}
    assert history[0]["config"]["lr"] == 0.003  # the config the run started with is kept


def test_resume_with_only_out_dir_continues_with_saved_config(finished, tmp_path):
    cache, out = copy_of(finished, tmp_path, cut_to=4)
    run(parse_args(["--resume", "--out-dir", str(out), "--steps", "8"]))
    got, ref = losses(out), losses(finished[1])
    assert sorted(got) == list(range(1, 9))
    assert all(got[s] == ref[s] for s in (1, 2, 3, 4, 5, 6))  # the killed attempt's 5, 6 were redone identically


def test_run_config_file_is_accepted_by_config(finished, tmp_path):
    cache, full = finished
    out = tmp_path / "again"
    run(parse_args(["--config", str(full / "config.yaml"), "--out-dir", str(out), "--resume", "false"]))
    assert losses(out) == losses(full)


def test_superseded_metrics_leave_one_record_per_step(finished, tmp_path):
    cache, out = copy_of(finished, tmp_path, cut_to=4)
    run(parse_args(args(cache, out, "--resume")))
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[0] == 0 and steps[-1] == 6
    superseded = [json.loads(line)["step"] for line in (out / "metrics.superseded.jsonl").read_text().splitlines()]
    assert superseded == [5, 6]


def test_steps_not_past_the_checkpoint_is_refused(finished, tmp_path):
    cache, out = copy_of(finished, tmp_path)
    refused(args(cache, out, "--resume"), "steps = 6, but the run's newest checkpoint is at step 6", out)


def test_resume_refuses_a_directory_that_is_not_a_run(finished, tmp_path):
    cache, _ = finished
    out = tmp_path / "mine"
    out.mkdir()
    for name in ("config.yaml", "summary.json", "loss.png"):
        (out / name).write_text("the user's own file\n")
    refused(args(cache, out, "--resume"), "is not a run of launch.train", out)
    assert not (out / run_dir.LOCK).exists() or (out / run_dir.LOCK).read_text() == ""


def test_pickle_payload_planted_in_the_newest_checkpoint_never_runs(finished, tmp_path):
    import pickle

    from test_checkpoint import _Payload, _plant

    cache, out = copy_of(finished, tmp_path, cut_to=4)
    marker = tmp_path / "pwned"
    ckpt = out / "checkpoints" / "step_00000004"
    _plant(ckpt / "rank00000.safetensors", marker, ckpt)
    with pytest.raises(checkpoint.CheckpointError, match="not a readable safetensors file"):
        run(parse_args(args(cache, out, "--resume")))
    # A new, higher step directory holding only a pickle (the old format) is refused by name.
    planted = out / "checkpoints" / "step_00000099"
    planted.mkdir()
    (planted / "rank00000.pt").write_bytes(pickle.dumps(_Payload(marker)))
    entry = {"file": "rank00000.pt", "bytes": (planted / "rank00000.pt").stat().st_size,
             "sha256": checkpoint._digest(planted / "rank00000.pt")}
    (planted / "manifest.json").write_text(json.dumps({"step": 99, "world_size": 1, "files": [entry]}))
    with pytest.raises(checkpoint.CheckpointMismatch, match="pickle"):
        run(parse_args(args(cache, out, "--resume")))
    assert not marker.exists()


def test_second_trainer_is_refused_while_the_first_holds_the_lock(finished, tmp_path):
    cache, out = copy_of(finished, tmp_path, cut_to=4)
    # A live holder in another process; once it is SIGKILLed, its lock goes with it.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from launch.checkpoint.run_dir import RunLock; "
                               f"RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        refused(args(cache, out, "--resume"), rf"in use by another trainer \(pid {holder.pid} on ", out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    run(parse_args(args(cache, out, "--resume")))  # the stale lock file does not block the relaunch
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]


def test_bad_optimizer_or_data_leaves_no_run_directory(finished, tmp_path):
    cache, _ = finished
    out = tmp_path / "new"
    for extra, match in [(["--optimizer-args", "{bogus: 1}"], "bogus"),
                         (["--optimizer", "adamx"], "adamx"),
                         (["--data", str(tmp_path / "missing.txt")], "does not exist")]:
        with pytest.raises(ConfigError, match=match):
            run(parse_args(args(cache, out, *extra)))
        assert not out.exists()
    run(parse_args(args(cache, out, "--steps", "2")))  # the corrected command is not refused


def test_last_step_skipped_is_not_success(finished, tmp_path, monkeypatch):
    cache, _ = finished
    real_forward = moe.model.Transformer.forward

    def nan_when_training(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        if self.training:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(moe.model.Transformer, "forward", nan_when_training)
    out = tmp_path / "all-skipped"
    with pytest.raises(TrainingFailed, match="step 3 was never trained or saved"):
        run(parse_args(args(cache, out, "--steps", "3", "--max-skipped-steps", "5")))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["skipped_steps"] == 3 and summary["last_checkpoint"] is None
    with pytest.raises(SystemExit, match="training failed: "):
        main(args(cache, tmp_path / "again", "--steps", "3"))


def test_full_disk_during_a_checkpoint_ends_with_a_message(finished, tmp_path, monkeypatch):
    import errno

    from launch.checkpoint import state_files
    cache, _ = finished
    real_save = state_files.save_file
    calls = {"n": 0}

    def fill_disk(*a, **kw):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*a, **kw)

    monkeypatch.setattr(state_files, "save_file", fill_disk)
    out = tmp_path / "full"
    with pytest.raises(SystemExit, match=r"checkpoint error: writing checkpoint step_00000004 .*No space left on device"):
        main(args(cache, out))
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"


@pytest.mark.distributed
def test_one_process_run_relaunched_under_torchrun_resumes(finished, tmp_path):
    """Checkpoints do not depend on the layout: a one-process run goes on under DeepSpeed (ZeRO-1)."""
    cache, out = copy_of(finished, tmp_path, cut_to=4)
    torchrun(["-m", "launch.train", *args(cache, out, "--resume")], nproc=1, timeout=240)
    ref, got = losses(finished[1]), losses(out)
    assert max(abs(got[s] - ref[s]) / ref[s] for s in (5, 6)) <= 1e-6, (ref, got)


def test_resume_may_change_the_split_of_the_global_batch_but_not_its_size(finished, tmp_path):
    cache, out = copy_of(finished, tmp_path, cut_to=4)
    refused(args(cache, out, "--resume", "--grad-accum", "1"),
            r"global batch is micro_batch_size x grad_accum x data-parallel size \(world / pp_size\) = 4 x 2 x 1 = 8 "
            r"sequences, this command's is 4 x 1 x 1 = 4", out)
    run(parse_args(args(cache, out, "--resume", "--micro-batch-size", "8", "--grad-accum", "1")))
    ref, got = losses(finished[1]), losses(out)
    assert max(abs(got[s] - ref[s]) / ref[s] for s in (5, 6)) <= 1e-6, (ref, got)
    history = [json.loads(line) for line in (out / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changed"] == {"grad_accum": [2, 1], "micro_batch_size": [4, 8]}


def test_resume_refuses_a_checkpoint_of_the_previous_unsharded_format(finished, tmp_path):
    cache, out = copy_of(finished, tmp_path, cut_to=4)
    manifest_path = out / "checkpoints" / "step_00000004" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["shards"]
    manifest_path.write_text(json.dumps({**manifest, "format": checkpoint.PREVIOUS}))
    refused(args(cache, out, "--resume"), "where each rank kept its whole state for one layout; this version "
            "resumes the trainer from the sharded format", out)


def test_run_keeps_its_tokenizer_and_export_carries_it(finished, tmp_path):
    """The run directory says which tokenizer its ids mean; the Hugging Face export loads in
    transformers with it, and config.json's special ids are the tokenizer's end-of-document."""
    from transformers import AutoTokenizer

    from launch.export import main as export_main

    cache, full = finished
    assert (full / "tokenizer.json").is_file() and oct((full / "tokenizer.json").stat().st_mode & 0o777) == "0o644"
    hf = tmp_path / "hf"
    export_main([str(full / "checkpoints"), "--hf-dir", str(hf)])
    tok = AutoTokenizer.from_pretrained(hf)
    text = "def f(x):\n    return x\n"
    assert tok(text, add_special_tokens=False)["input_ids"] == list(text.encode())
    config = json.loads((hf / "config.json").read_text())
    assert config["eos_token_id"] == config["bos_token_id"] == 256
    assert 256 in json.loads((hf / "generation_config.json").read_text())["eos_token_id"]


def test_resume_refuses_a_tokenizer_that_is_not_the_runs(finished, tmp_path):
    cache, out = copy_of(finished, tmp_path, cut_to=4)
    saved = json.loads((out / "tokenizer.json").read_text())
    vocab = saved["model"]["vocab"]
    first, second = list(vocab)[:2]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (out / "tokenizer.json").write_text(json.dumps(saved))
    refused(args(cache, out, "--resume"), "is not the tokenizer this command built", out)
