"""Checkpoints that a crash cannot fake, and resume that falls back past damaged ones.

Layout under <out_dir>/checkpoints/:

    step_00000120/rank00000.pt ...   one file per rank: its model share, optimizer partition,
                                     scheduler, data position and RNG states
    step_00000120/manifest.json      step, world and EP size, and every file's byte count and SHA-256
    latest                           the name of the newest complete checkpoint

Write protocol: every rank writes into `step_N.tmp/` and fsyncs; the ranks' sizes and digests are
gathered on rank 0 (which doubles as "everybody finished"); rank 0 writes the manifest, renames the
directory to `step_N/` and only then replaces `latest` (write-and-rename, atomic on POSIX). A crash at
any point leaves either no `step_N/` at all or a complete one, and `latest` always names a complete
checkpoint. A truncated or corrupted file is caught by the manifest at load, and `find_resumable`
falls back to the newest checkpoint that verifies. Multi-node runs need out_dir on a shared filesystem.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or damaged; the message says which file and how."""


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _rank_file(rank: int) -> str:
    return f"rank{rank:05d}.pt"


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def save(root: Path, step: int, state: dict, meta: dict, keep: int) -> Path:
    """Write this rank's `state` as checkpoint `step` (collective: every rank calls it).

    `meta` (world size, EP size...) goes into the manifest and is checked at resume. Keeps the
    newest `keep` complete checkpoints and deletes older ones (0 keeps all).
    """
    root = Path(root)
    rank, world = _world()
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a crash while writing this step earlier
        tmp.mkdir(parents=True)
    if dist.is_initialized():
        dist.barrier()
    path = tmp / _rank_file(rank)
    with path.open("wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    entry = {"file": path.name, "bytes": path.stat().st_size, "sha256": _digest(path)}
    entries = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(entries, entry)  # returns on a rank once every rank has written
    else:
        entries = [entry]
    if rank == 0:
        manifest = {"step": step, "world_size": world, **meta, "files": entries}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        _fsync_dir(tmp)
        if final.exists():  # a checkpoint of this step from a run that crashed later: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        pointer = root / "latest.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / "latest")
        _fsync_dir(root)
        _prune(root, keep)
    if dist.is_initialized():
        dist.barrier()  # nobody runs ahead (and maybe crashes) before the pointer has moved
    return final


def _complete_dirs(root: Path) -> list[Path]:
    """step_* directories (never *.tmp) by step, newest first."""
    if not root.is_dir():
        return []
    dirs = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(dirs, key=lambda p: p.name, reverse=True)


def _prune(root: Path, keep: int) -> None:
    for p in root.iterdir():
        if p.name.endswith(".tmp") and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    if keep > 0:
        for old in _complete_dirs(root)[keep:]:
            shutil.rmtree(old, ignore_errors=True)


def verify(ckpt: Path, meta: dict) -> dict:
    """The manifest of `ckpt` if every file is there with its recorded size and digest and the run's
    geometry matches `meta`; raises CheckpointError naming the first problem otherwise."""
    manifest_path = ckpt / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt}: no manifest.json, the checkpoint was never completed")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{manifest_path}: unreadable ({err})") from None
    for key, value in meta.items():
        if manifest.get(key) != value:
            raise CheckpointError(
                f"{ckpt}: saved with {key} = {manifest.get(key)!r}, this run has {key} = {value!r}; "
                f"relaunch with the same {key} to resume from it"
            )
    for entry in manifest["files"]:
        path = ckpt / entry["file"]
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest recorded {entry['bytes']} (truncated?)")
        if _digest(path) != entry["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 differs from the manifest's (corrupted)")
    return manifest


def find_resumable(root: Path, meta: dict, log=print) -> Path | None:
    """The newest checkpoint under `root` that verifies, starting from the one `latest` names;
    None if there is none. Every rejected checkpoint is reported through `log` with its reason."""
    root = Path(root)
    candidates = _complete_dirs(root)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        # Newer complete directories than `latest` can exist only if a crash hit between the rename
        # and the pointer update; they verify like any other, so keep plain newest-first order.
        if named not in candidates:
            log(f"checkpoint: `latest` names {named.name}, which does not exist; searching {root}")
    for ckpt in candidates:
        try:
            verify(ckpt, meta)
            return ckpt
        except CheckpointError as err:
            log(f"checkpoint: skipping {ckpt.name}: {err}")
    return None


def resolve_resume(root: Path, meta: dict) -> Path | None:
    """`find_resumable` on rank 0, its answer broadcast, so every rank loads the same checkpoint
    (collective). Rejections are printed to stderr."""
    rank, _ = _world()
    choice = [None]
    if rank == 0:
        found = find_resumable(root, meta, log=lambda m: print(m, file=sys.stderr, flush=True))
        choice = [str(found) if found else None]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    return Path(choice[0]) if choice[0] else None


def load(ckpt: Path) -> dict:
    """This rank's state from a checkpoint `resolve_resume` chose."""
    rank, _ = _world()
    # Our own files, holding numpy and Python RNG states besides tensors: a full unpickle.
    return torch.load(ckpt / _rank_file(rank), map_location="cpu", weights_only=False)


def latest(root: Path) -> str | None:
    """What `latest` names under `root` (for messages), or None."""
    pointer = Path(root) / "latest"
    return str(Path(root) / pointer.read_text().strip()) if pointer.is_file() else None
