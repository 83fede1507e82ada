"""Checkpoint write protocol, damage detection and the pickle-free format, in one process."""

import errno
import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from launch.checkpoint import state_files
from launch.checkpoint import store as checkpoint

META = {"ep_size": 1}


def _state(step):
    return {"weights": torch.full((64,), float(step)), "step": step}


def test_latest_names_newest_complete_and_prune_keeps_n(tmp_path):
    for step in (2, 4, 6):
        checkpoint.save(tmp_path, step, _state(step), META, keep=2)
    assert (tmp_path / "latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004", "step_00000006"]
    ckpt, damaged = checkpoint.find_resumable(tmp_path, META)
    assert ckpt.name == "step_00000006" and damaged == []
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "rank00000.json", "rank00000.safetensors"]
    assert checkpoint.load(ckpt)["step"] == 6


def test_truncated_file_falls_back_to_previous_with_reason(tmp_path, capsys):
    for step in (2, 4):
        checkpoint.save(tmp_path, step, _state(step), META, keep=0)
    victim = tmp_path / "step_00000004" / "rank00000.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(checkpoint.CheckpointError, match=r"rank00000.safetensors: 100 bytes, the manifest recorded \d+ \(truncated\?\)"):
        checkpoint.verify(tmp_path / "step_00000004", META)
    ckpt, damaged = checkpoint.find_resumable(tmp_path, META)
    assert ckpt.name == "step_00000002" and damaged == ["step_00000004"]
    assert "skipping step_00000004" in capsys.readouterr().out
    # Set aside, the damaged one is kept, never pruned and never resumed.
    assert checkpoint.set_aside(tmp_path, damaged) == ["step_00000004.damaged"]
    checkpoint.save(tmp_path, 4, _state(4), META, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000004", "step_00000004.damaged"]


def test_same_size_corruption_is_caught_by_digest(tmp_path):
    checkpoint.save(tmp_path, 2, _state(2), META, keep=0)
    victim = tmp_path / "step_00000002" / "rank00000.json"
    data = bytearray(victim.read_bytes())
    data[-20] ^= 0x01
    victim.write_bytes(bytes(data))
    with pytest.raises(checkpoint.CheckpointError, match="SHA-256 differs"):
        checkpoint.verify(tmp_path / "step_00000002", META)


def test_no_usable_checkpoint_is_an_error_naming_each(tmp_path):
    for step in (2, 4):
        checkpoint.save(tmp_path, step, _state(step), META, keep=0)
        (tmp_path / f"step_{step:08d}" / "rank00000.json").write_text("{}")
    before = sorted(os.walk(tmp_path))
    with pytest.raises(checkpoint.CheckpointError) as err:
        checkpoint.find_resumable(tmp_path, META)
    assert "none of the 2 checkpoint(s)" in str(err.value)
    assert "step_00000004: " in str(err.value) and "step_00000002: " in str(err.value)
    assert sorted(os.walk(tmp_path)) == before  # nothing touched
    assert checkpoint.find_resumable(tmp_path / "absent", META) == (None, [])


def test_unfinished_write_is_never_resumed(tmp_path):
    """A crash mid-write leaves step_N.tmp/ (ignored) or a directory without manifest (rejected)."""
    checkpoint.save(tmp_path, 2, _state(2), META, keep=0)
    (tmp_path / "step_00000004.tmp").mkdir()
    (tmp_path / "step_00000004.tmp" / "rank00000.json").write_bytes(b"partial")
    (tmp_path / "step_00000006").mkdir()  # as if renamed by hand without its manifest
    assert checkpoint.find_resumable(tmp_path, META)[0].name == "step_00000002"
    # The next save of step 4 clears the debris and completes normally.
    checkpoint.save(tmp_path, 4, _state(4), META, keep=0)
    assert checkpoint.load(tmp_path / "step_00000004")["step"] == 4


def test_geometry_mismatch_is_an_error_not_a_skip(tmp_path):
    checkpoint.save(tmp_path, 2, _state(2), {"ep_size": 1}, keep=0)
    checkpoint.save(tmp_path, 4, _state(4), {"ep_size": 2}, keep=0)
    with pytest.raises(checkpoint.CheckpointMismatch, match="saved with ep_size = 2, this run has ep_size = 1"):
        checkpoint.find_resumable(tmp_path, {"ep_size": 1})
    manifest = json.loads((tmp_path / "step_00000002" / "manifest.json").read_text())
    assert manifest["world_size"] == 1 and manifest["format"] == checkpoint.FORMAT


def test_full_disk_is_a_clear_error_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 2, _state(2), META, keep=0)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(state_files, "save_file", no_space)
    with pytest.raises(checkpoint.CheckpointError, match=r"writing checkpoint step_00000004 .* No space left on device.*"
                       r"newest complete checkpoint is still .*step_00000002"):
        checkpoint.save(tmp_path, 4, _state(4), META, keep=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000002"]


def test_state_round_trips_exactly():
    """What the trainer saves: optimizer state keyed by int, tuples, RNG states, dtypes, non-finite
    floats, tied (shared) tensors and views into one flat buffer (ZeRO's layout)."""
    flat = torch.arange(10, dtype=torch.float32)
    tied = torch.randn(3, 4)
    random.seed(3)
    state = {
        "model": {"a": tied, "b": tied, "view1": flat[:4], "view2": flat[4:].view(2, 3), "bf16": torch.ones(2, dtype=torch.bfloat16)},
        "optimizer": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(5)}},
                      "param_groups": [{"lr": 1e-3, "betas": (0.9, 0.95), "ns_dtype": torch.bfloat16, "params": [0],
                                        "eps": float("inf"), "name": "muon", "foreach": None}]},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        "empty": torch.empty(0, 7), "scalar": torch.tensor(2, dtype=torch.int64), "nan": float("nan"),
    }
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        paths = Path(tmp) / "s.json", Path(tmp) / "s.safetensors"
        state_files.save(state, *paths)
        got = state_files.load(*paths)
        assert list(state_files.load(*paths, only="model")) == list(state["model"])
    assert got["rng"]["python"] == state["rng"]["python"]
    np.testing.assert_array_equal(got["rng"]["numpy"][1], state["rng"]["numpy"][1])
    assert got["rng"]["numpy"][0] == "MT19937" and got["rng"]["numpy"][2:] == state["rng"]["numpy"][2:]
    assert torch.equal(got["rng"]["torch"], state["rng"]["torch"])
    assert got["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    assert list(got["optimizer"]["state"]) == [0] and torch.equal(got["optimizer"]["state"][0]["step"], torch.tensor(3.0))
    for key, value in state["model"].items():
        assert torch.equal(got["model"][key], value) and got["model"][key].dtype == value.dtype
    assert got["empty"].shape == (0, 7) and got["scalar"].item() == 2 and got["nan"] != got["nan"]


def test_unknown_objects_fail_at_save_naming_where(tmp_path):
    class Opaque:
        pass

    with pytest.raises(TypeError, match=r"state\.optimizer\.scaler: a .*Opaque cannot be stored"):
        state_files.save({"optimizer": {"scaler": Opaque()}}, tmp_path / "a.json", tmp_path / "a.safetensors")


class _Payload:
    """Unpickling this writes a marker file: the proof that a loader ran code from a file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(path, marker, ckpt):
    """Replace `path` with a pickle payload and rewrite the manifest so its size and digest match."""
    path.write_bytes(pickle.dumps({"model": _Payload(marker)}))
    manifest_path = ckpt / "manifest.json"
    if path != manifest_path:
        manifest = json.loads(manifest_path.read_text())
        for entry in manifest["files"]:
            if entry["file"] == path.name:
                entry["bytes"], entry["sha256"] = path.stat().st_size, checkpoint._digest(path)
        manifest_path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("victim", ["manifest.json", "rank00000.json", "rank00000.safetensors"])
def test_payload_in_any_checkpoint_file_never_runs(tmp_path, victim):
    from launch.export import consolidate
    from moe.config import preset
    from moe.model import Transformer

    cfg = preset("tiny")
    model = Transformer(cfg)
    root = tmp_path / "checkpoints"
    checkpoint.save(root, 2, {"model": model.state_dict(), "step": 2}, {"model_config": vars(cfg)}, keep=0)
    ckpt = root / "step_00000002"
    marker = tmp_path / "pwned"
    _plant(ckpt / victim, marker, ckpt)
    with pytest.raises(checkpoint.CheckpointError):  # what --resume does: choose, then load
        found, _ = checkpoint.find_resumable(root, {})
        checkpoint.load(found)
    with pytest.raises(checkpoint.CheckpointError):  # what launch.export does
        consolidate(ckpt)
    assert not marker.exists()


def test_old_pickle_checkpoint_is_refused_unread(tmp_path):
    """A step directory in the old rank*.pt layout (here: a payload, digests matching) is named and
    refused, even when it is the newest, and nothing in it is unpickled."""
    checkpoint.save(tmp_path, 2, _state(2), META, keep=0)
    old = tmp_path / "step_00000009"
    old.mkdir()
    marker = tmp_path / "pwned"
    (old / "rank00000.pt").write_bytes(pickle.dumps(_Payload(marker)))
    entry = {"file": "rank00000.pt", "bytes": (old / "rank00000.pt").stat().st_size,
             "sha256": checkpoint._digest(old / "rank00000.pt")}
    (old / "manifest.json").write_text(json.dumps({"step": 9, "world_size": 1, "ep_size": 1, "files": [entry]}))
    with pytest.raises(checkpoint.CheckpointMismatch, match="old rank\\*.pt format, a pickle"):
        checkpoint.find_resumable(tmp_path, META)
    assert not marker.exists()


def test_no_source_file_unpickles():
    """The guarantee, checked where it could break: no library code calls a pickle loader."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    offenders = []
    for package in (p for p in root.iterdir() if (p / "__init__.py").is_file()):  # every package of ours
        for path in package.rglob("*.py"):
            text = path.read_text()
            for needle in ("torch.load(", "pickle.load", "weights_only=False", "import pickle", "np.load("):
                if needle in text:
                    offenders.append(f"{path.relative_to(root)}: {needle}")
    assert offenders == []


def test_export_writes_safetensors_and_never_replaces_a_file(tmp_path):
    from safetensors.torch import load_file

    from launch.export import main as export_main
    from moe.config import preset
    from moe.model import Transformer

    cfg = preset("tiny", tie_embeddings=True)
    model = Transformer(cfg)
    root = tmp_path / "checkpoints"
    checkpoint.save(root, 2, {"model": model.state_dict(), "step": 2}, {"model_config": vars(cfg)}, keep=0)
    target = tmp_path / "model.safetensors"
    export_main([str(root), "--safetensors", str(target)])
    again = Transformer(cfg)
    again.load_state_dict(load_file(target))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    before = target.read_bytes()
    with pytest.raises(SystemExit, match="already exists; nothing was written"):
        export_main([str(root), "--safetensors", str(target)])
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not an empty directory; nothing was written"):
        export_main([str(root), "--hf-dir", str(tmp_path / "hf")])
    assert target.read_bytes() == before and sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["notes.txt"]


def test_export_gathers_experts_from_expert_parallel_ranks(tmp_path):
    """Two EP ranks' files, each with half of every expert stack (rank p holds experts [p*E/2, (p+1)*E/2)),
    consolidate into the one model they came from."""
    from launch.export import consolidate
    from moe.config import preset
    from moe.model import Transformer

    cfg = preset("tiny")
    model = Transformer(cfg)
    full = model.state_dict()
    root, tmp = tmp_path / "checkpoints", tmp_path / "checkpoints" / "step_00000002.tmp"
    tmp.mkdir(parents=True)
    files = []
    for rank in range(2):
        shard = {k: (v.chunk(2)[rank] if ".experts." in k else v) for k, v in full.items()}
        paths = [tmp / name for name in checkpoint._rank_files(rank)]
        state_files.save({"model": shard, "step": 2}, *paths)
        files += [{"file": p.name, "bytes": p.stat().st_size, "sha256": checkpoint._digest(p)} for p in paths]
    checkpoint._publish(root, tmp, root / "step_00000002", 2, 2, {"ep_size": 2, "model_config": vars(cfg)}, files, 0)
    got = consolidate(root / "step_00000002").state_dict()
    assert any(".experts." in k for k in full) and all(torch.equal(got[k], full[k]) for k in full)
