"""The trainer's checkpoints in one process: exact resume, fallback past damage, non-finite steps."""

import json
import math
import shutil

import pytest
import torch

import moe.model
from launch.checkpoint import store as checkpoint
from launch.config.training import parse_args
from launch.train import run


def args(tmp_path, out, *extra):
    return [
        "--model", "tiny", "--data.tokenizer", "bytes", "--data.max_bytes", "200000",
        "--data.cache_dir", str(tmp_path / "cache"), "--seq-len", "32", "--micro-batch-size", "4",
        "--grad-accum", "2", "--steps", "6", "--warmup-steps", "2", "--eval-every", "100", "--eval-batches", "1",
        "--checkpoint-every", "2", "--keep-checkpoints", "0", "--device", "cpu", "--out-dir", str(out), *extra,
    ]


def losses(out, key="lm_loss"):
    return {r["step"]: r[key] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if key in r}


def final_weights(out, step=6):
    """Every sharded tensor of the checkpoint (weights and optimizer state), by its single-device key."""
    reader = checkpoint.open_shards(out / "checkpoints" / f"step_{step:08d}")
    return {key: reader.full(key) for key in reader.keys("")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("full")
    run(parse_args(args(tmp, tmp / "run", "--optimizer", "muonclip")))
    return tmp, tmp / "run"


def _resume_from(tmp, full, step, name, damage=None):
    """A copy of the finished run cut back to checkpoint `step` (as if it crashed after it), resumed."""
    out = tmp / name
    shutil.copytree(full, out)
    for later in (out / "checkpoints").glob("step_*"):
        if int(later.name[5:]) > step:
            shutil.rmtree(later)
    (out / "checkpoints" / "latest").write_text(f"step_{step:08d}\n")
    if damage:
        damage(out / "checkpoints" / f"step_{step:08d}" / "rank00000.safetensors")
    (out / "metrics.jsonl").write_text("")
    run(parse_args(args(tmp, out, "--optimizer", "muonclip", "--resume")))
    return out


def test_resume_is_bit_identical(uninterrupted):
    tmp, full = uninterrupted
    resumed = _resume_from(tmp, full, 4, "clean")
    ref, got = losses(full), losses(resumed)
    assert sorted(got) == [5, 6]
    assert all(got[s] == ref[s] for s in got)  # bit-identical losses after the resume
    # MuonClip logs the largest attention logit its clip saw; the resumed run sees the same ones.
    assert losses(resumed, "max_logit") == {s: losses(full, "max_logit")[s] for s in (5, 6)}
    a, b = final_weights(full), final_weights(resumed)
    assert sorted(a) == sorted(b) and any(k.startswith("optimizer/") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    plain = [checkpoint.load(out / "checkpoints" / "step_00000006") for out in (full, resumed)]
    assert plain[0]["data"] == plain[1]["data"]
    for key in ("last_epoch", "_last_lr"):
        assert plain[0]["scheduler"][key] == plain[1]["scheduler"][key]


def test_truncated_checkpoint_falls_back_to_previous(uninterrupted, capsys):
    tmp, full = uninterrupted
    resumed = _resume_from(tmp, full, 4, "damaged", damage=lambda f: f.write_bytes(f.read_bytes()[:1000]))
    err = capsys.readouterr().err
    assert "skipping step_00000004" in err and "truncated" in err
    assert "resuming from" in err and "step_00000002 at step 2" in err
    ref, got = losses(full), losses(resumed)
    assert sorted(got) == [3, 4, 5, 6] and all(got[s] == ref[s] for s in got)


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch, capsys):
    """Training forwards 5-6 (step 3) and from 9 on (steps 5+) return a NaN loss. Step 3 is skipped
    and the run goes on; with max_skipped_steps = 2, the third bad step in a row (7) stops it, and the
    last good checkpoint (step 4) is intact."""
    real_forward = moe.model.Transformer.forward
    calls = {"n": 0}

    def nan_loss_on_some_steps(self, *a, **kw):
        out = real_forward(self, *a, **kw)
        if self.training:
            calls["n"] += 1
            if calls["n"] in (5, 6) or calls["n"] >= 9:
                out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(moe.model.Transformer, "forward", nan_loss_on_some_steps)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"3 steps in a row had a non-finite loss or gradient \(max_skipped_steps = 2\)"):
        run(parse_args(args(tmp_path, out, "--max-skipped-steps", "2", "--steps", "8")))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("skipped")] == [3, 5, 6, 7]
    assert all(not math.isfinite(r["grad_norm"]) for r in records if r.get("skipped"))
    assert "step 3: non-finite loss or gradient" in capsys.readouterr().err
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    manifest = checkpoint.verify(out / "checkpoints" / "step_00000004", {"world_size": 1})
    state = checkpoint.load(out / "checkpoints" / "step_00000004")
    assert manifest["step"] == 4 and state["step"] == 4
    assert all(torch.isfinite(t).all() for t in final_weights(out, 4).values())
