"""Checkpoint write protocol and damage detection, in one process (no launcher needed)."""

import json

import pytest
import torch

from launch import checkpoint


def _state(step):
    return {"weights": torch.full((64,), float(step)), "step": step}


def test_latest_names_newest_complete_and_prune_keeps_n(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save(tmp_path, step, _state(step), {"ep_size": 1}, keep=2)
    assert (tmp_path / "latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    ckpt = checkpoint.resolve_resume(tmp_path, {"ep_size": 1})
    assert ckpt.name == "step_00000006"
    assert checkpoint.load(ckpt)["step"] == 6


def test_truncated_file_falls_back_to_previous_with_reason(tmp_path, capsys):
    for step in (2, 4):
        checkpoint.save(tmp_path, step, _state(step), {"ep_size": 1}, keep=0)
    victim = tmp_path / "step_00000004" / "rank00000.pt"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match=r"rank00000.pt: 100 bytes, the manifest recorded \d+ \(truncated\?\)"):
        checkpoint.verify(tmp_path / "step_00000004", {"ep_size": 1})
    ckpt = checkpoint.resolve_resume(tmp_path, {"ep_size": 1})
    assert ckpt.name == "step_00000002"
    assert "skipping step_00000004" in capsys.readouterr().err


def test_same_size_corruption_is_caught_by_digest(tmp_path):
    checkpoint.save(tmp_path, 2, _state(2), {"ep_size": 1}, keep=0)
    victim = tmp_path / "step_00000002" / "rank00000.pt"
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="SHA-256 differs"):
        checkpoint.verify(tmp_path / "step_00000002", {"ep_size": 1})
    assert checkpoint.resolve_resume(tmp_path, {"ep_size": 1}) is None


def test_unfinished_write_is_never_resumed(tmp_path):
    """A crash mid-write leaves step_N.tmp/ (ignored) or a directory without manifest (rejected)."""
    checkpoint.save(tmp_path, 2, _state(2), {"ep_size": 1}, keep=0)
    (tmp_path / "step_00000004.tmp").mkdir()
    (tmp_path / "step_00000004.tmp" / "rank00000.pt").write_bytes(b"partial")
    (tmp_path / "step_00000006").mkdir()  # as if renamed by hand without its manifest
    assert checkpoint.resolve_resume(tmp_path, {"ep_size": 1}).name == "step_00000002"
    # The next save of step 4 clears the debris and completes normally.
    checkpoint.save(tmp_path, 4, _state(4), {"ep_size": 1}, keep=0)
    assert checkpoint.load(tmp_path / "step_00000004")["step"] == 4


def test_geometry_mismatch_is_refused_by_name(tmp_path):
    checkpoint.save(tmp_path, 2, _state(2), {"ep_size": 2}, keep=0)
    with pytest.raises(checkpoint.CheckpointError, match="saved with ep_size = 2, this run has ep_size = 1"):
        checkpoint.verify(tmp_path / "step_00000002", {"ep_size": 1})
    manifest = json.loads((tmp_path / "step_00000002" / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["files"][0]["file"] == "rank00000.pt"
