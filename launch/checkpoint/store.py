"""Checkpoints that a crash cannot fake and that cannot run code, and resume that falls back past
damaged ones but never past ones this run cannot use.

Layout under <out_dir>/checkpoints/:

    step_00000120/rank00000.json         per rank: the structure of its plain state (scheduler, data
                                         position, RNG, step) and every plain value
    step_00000120/rank00000.safetensors  per rank: the tensors of that state, and the pieces of the
                                         sharded tensors (weights, optimizer state) this rank owns
    step_00000120/manifest.json          format, step, the layout it was written on (world, EP size,
                                         ZeRO stage), the model and training config, every file's
                                         byte count and SHA-256, and the shard index
    latest                               the name of the newest complete checkpoint

Sharded tensors (`launch/checkpoint/shards.py`) are keyed by their names in the single-device model
(`model/<name>`, `optimizer/<name>/<state>`); each element is written by one rank, and the index says
which rank's file holds each piece, so any other layout can read what it needs. Trainers whose ranks
all hold one replicated state (RL, TRM) pass no shards and keep their whole state per rank.

Nothing is unpickled: the state is JSON plus safetensors (`launch/checkpoint/state_files.py`), so a checkpoint
handed over by someone else is data, never code. Checkpoints in the old `rank*.pt` (pickle) format
are refused with a message, not loaded.

Write protocol: every rank writes into `step_N.tmp/` and fsyncs; the ranks' sizes and digests are
gathered on rank 0 (which doubles as "everybody finished"); rank 0 writes the manifest, renames the
directory to `step_N/` and only then replaces `latest` (write-and-rename, atomic on POSIX). A crash at
any point leaves either no `step_N/` at all or a complete one, and `latest` always names a complete
checkpoint. A truncated or corrupted file is caught by the manifest at load, and `find_resumable`
falls back to the newest checkpoint that verifies. Multi-node runs need out_dir on a shared filesystem.

Two kinds of rejection: a checkpoint that is damaged (a file missing, truncated or altered) is
skipped for the one before it; a checkpoint this run cannot use (a value of `meta` that differs, a
format without the shard index where the run needs one, the old pickle format) stops the resume with
`CheckpointMismatch`, since an older checkpoint of the same run would not fit either. When no
checkpoint is usable the resume stops, naming each one and why, and nothing on disk is touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from launch.checkpoint import shards as sharding
from launch.checkpoint import state_files

_STEP_DIR = re.compile(r"^step_(\d{8})$")
FORMAT = "kimi-moe-checkpoint/3"  # JSON + safetensors with an optional shard index
# Still read: JSON + safetensors, each rank's whole state for one layout (no shard index). The pickle layout had no format.
PREVIOUS = "kimi-moe-checkpoint/2"
# A `meta` key that is not compared with the manifest: True when the run needs the shard index.
SHARDED = "sharded"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or damaged; the message says which file and how."""


class CheckpointMismatch(CheckpointError):
    """An intact checkpoint this run cannot use (geometry, format, model): an error, never a skip."""


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


def _rank_files(rank: int) -> tuple[str, str]:
    """(structure, tensors) file names of one rank's state."""
    return f"rank{rank:05d}.json", f"rank{rank:05d}.safetensors"


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


def save(root: Path, step: int, state: dict, meta: dict, keep: int, shards: sharding.ShardSet | None = None) -> Path:
    """Write this rank's `state` as checkpoint `step` (collective: every rank calls it).

    `meta` (world size, EP size...) goes into the manifest. `shards`: the sharded tensors this rank
    holds; every rank passes them or none does, and each element is written once (`shards.assign`).
    Keeps the newest `keep` complete checkpoints and deletes older ones (0 keeps all).
    """
    root = Path(root)
    rank, world = _world()
    index = None
    if shards is not None:
        described = [None] * world
        if dist.is_initialized():
            dist.all_gather_object(described, sharding.describe(shards))
        else:
            described = [sharding.describe(shards)]
        index = sharding.assign(described)  # the same on every rank: a pure function of what all hold
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    setup_error = None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # debris of a crash while writing this step earlier
        try:
            tmp.mkdir(parents=True)
        except OSError as err:
            setup_error = err
    if dist.is_initialized():
        dist.barrier()
    try:
        if setup_error:
            raise setup_error
        paths = [tmp / name for name in _rank_files(rank)]
        state_files.save(state, *paths, named=None if index is None else sharding.owned(shards, index, rank))
        entry = [{"file": p.name, "bytes": p.stat().st_size, "sha256": _digest(p)} for p in paths]
    except OSError as err:  # a full disk, a quota, a lost mount: every rank must hear of it, not hang
        entry = f"rank {rank}: {err}"
    entries = [None] * world
    if dist.is_initialized():
        dist.all_gather_object(entries, entry)  # returns on a rank once every rank has written
    else:
        entries = [entry]
    failures = [e for e in entries if isinstance(e, str)]
    if not failures and rank == 0:
        try:
            extra = {} if index is None else {"shards": index}
            _publish(root, tmp, final, step, world, {**meta, **extra}, [f for e in entries for f in e], keep)
        except OSError as err:
            failures = [f"rank 0: {err}"]
    if dist.is_initialized():
        shared = [failures]
        dist.broadcast_object_list(shared, src=0)  # also: nobody runs ahead before the pointer has moved
        failures = shared[0]
    if failures:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"writing checkpoint {final.name} under {root} failed ({'; '.join(failures)}); the newest complete "
            f"checkpoint is still {latest(root) or 'none'}. Free space (or fix the filesystem) and relaunch with --resume"
        )
    return final


def _publish(root: Path, tmp: Path, final: Path, step: int, world: int, meta: dict, files: list, keep: int) -> None:
    """Rank 0, once every rank's files are written: manifest, rename, pointer, prune."""
    manifest = {"format": FORMAT, "step": step, "world_size": world, **meta, "files": files}
    path = tmp / "manifest.json"
    with path.open("w") as f:
        f.write(json.dumps(manifest, indent=1))
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a checkpoint of this step from an attempt that crashed later: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    pointer = root / "latest.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    _prune(root, keep)


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


def read_manifest(ckpt: Path) -> dict:
    """The manifest of `ckpt`, checked to be a readable manifest of the current format."""
    manifest_path = ckpt / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{ckpt}: no manifest.json, the checkpoint was never completed")
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{manifest_path}: unreadable ({err})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), list):
        raise CheckpointError(f"{manifest_path}: not a checkpoint manifest (no list of files)")
    if manifest.get("format") not in (FORMAT, PREVIOUS):
        if "format" not in manifest and any(str(e.get("file", "")).endswith(".pt") for e in manifest["files"]
                                            if isinstance(e, dict)):
            raise CheckpointMismatch(
                f"{ckpt}: written in the old rank*.pt format, a pickle, which this version never loads because "
                "unpickling a file can run any code it names. Train it to a new checkpoint with the version that "
                "wrote it, or start a new run"
            )
        raise CheckpointMismatch(f"{manifest_path}: format {manifest.get('format')!r}; this version reads {FORMAT!r}")
    return manifest


def verify(ckpt: Path, meta: dict) -> dict:
    """The manifest of `ckpt` if every file is there with its recorded size and digest and the run's
    geometry matches `meta`. Raises CheckpointMismatch for an intact checkpoint this run cannot use,
    CheckpointError for a damaged one, naming the first problem."""
    manifest = read_manifest(ckpt)
    if meta.get(SHARDED) and "shards" not in manifest:
        raise CheckpointMismatch(
            f"{ckpt}: written in format {manifest.get('format')!r}, where each rank kept its whole state for one "
            f"layout; this version resumes the trainer from the sharded format {FORMAT!r} only. Resume it with "
            "the version that wrote it, or export it (python -m launch.export reads it) and start a new run "
            "with --init-from"
        )
    for key, value in meta.items():
        if key == SHARDED:
            continue
        if manifest.get(key) != value:
            raise CheckpointMismatch(
                f"{ckpt}: saved with {key} = {manifest.get(key)!r}, this run has {key} = {value!r}; "
                f"relaunch with the same {key} to resume from it"
            )
    expected = {name for r in range(manifest.get("world_size", 0)) for name in _rank_files(r)}
    listed = set()
    for entry in manifest["files"]:
        if not isinstance(entry, dict) or entry.get("file") not in expected:
            raise CheckpointError(f"{ckpt}/manifest.json: file entry {entry!r} is not one of this checkpoint's files")
        listed.add(entry["file"])
        path = ckpt / entry["file"]
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise CheckpointError(f"{path}: {size} bytes, the manifest recorded {entry.get('bytes')} (truncated?)")
        if _digest(path) != entry.get("sha256"):
            raise CheckpointError(f"{path}: SHA-256 differs from the manifest's (corrupted)")
    if listed != expected:
        raise CheckpointError(f"{ckpt}/manifest.json lists no entry for {sorted(expected - listed)[:4]}")
    return manifest


def find_resumable(root: Path, meta: dict, log=print) -> tuple[Path | None, list[str]]:
    """(the newest checkpoint under `root` that verifies, the names of the damaged ones newer than it).

    (None, []) when `root` holds no checkpoint at all. A damaged checkpoint is reported through `log`
    and skipped for an older one; one this run cannot use raises CheckpointMismatch; if every
    checkpoint is damaged, CheckpointError names each with its reason.
    """
    root = Path(root)
    candidates = _complete_dirs(root)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text(errors="replace").strip()
        # Newer complete directories than `latest` can exist only if a crash hit between the rename
        # and the pointer update; they verify like any other, so keep plain newest-first order.
        if named not in candidates:
            log(f"checkpoint: `latest` names {named.name}, which does not exist; searching {root}")
    damaged = []
    for ckpt in candidates:
        try:
            verify(ckpt, meta)
            return ckpt, [d for d, _ in damaged]
        except CheckpointMismatch:
            raise
        except CheckpointError as err:
            log(f"checkpoint: skipping {ckpt.name}: {err}")
            damaged.append((ckpt.name, str(err)))
    if damaged:
        reasons = "; ".join(f"{name}: {why}" for name, why in damaged)
        raise CheckpointError(f"none of the {len(damaged)} checkpoint(s) under {root} can be used ({reasons}); "
                              "nothing was changed")
    return None, []


def set_aside(root: Path, names: list[str]) -> list[str]:
    """Rename damaged checkpoints to step_N.damaged (never deleted, never pruned, never resumed), so
    a resume from an older one cannot overwrite what is left of them. Returns the new names."""
    moved = []
    for name in names:
        target, n = root / f"{name}.damaged", 1
        while target.exists():
            n += 1
            target = root / f"{name}.damaged{n}"
        os.replace(root / name, target)
        moved.append(target.name)
    if moved:
        _fsync_dir(root)
    return moved


def load(ckpt: Path, rank: int | None = None, only: str | None = None) -> dict:
    """Rank `rank`'s plain state (default: this process's) from a verified checkpoint; `only` reads
    one top-level key of it and no other tensors. `only="model"` of a sharded checkpoint is the
    whole single-device model's state, {name: tensor}, whichever layout wrote it."""
    if rank is None:
        rank, _ = _world()
    if only == "model" and "shards" in read_manifest(ckpt):
        reader = open_shards(ckpt)
        return {key.removeprefix("model/"): reader.full(key) for key in reader.keys("model/")}
    names = _rank_files(rank)
    try:
        return state_files.load(ckpt / names[0], ckpt / names[1], only=only)
    except state_files.StateFormatError as err:
        raise CheckpointError(str(err)) from None


def open_shards(ckpt: Path) -> sharding.Reader:
    """The sharded tensors of a verified checkpoint, read on demand (CheckpointError without an index)."""
    manifest = read_manifest(ckpt)
    if "shards" not in manifest:
        raise CheckpointMismatch(f"{ckpt}: format {manifest.get('format')!r} has no shard index")
    return sharding.Reader(ckpt, manifest["shards"], manifest.get("world_size", 0), lambda r: _rank_files(r)[1],
                           error=CheckpointError)


def latest(root: Path) -> str | None:
    """What `latest` names under `root` (for messages), or None."""
    pointer = Path(root) / "latest"
    return str(Path(root) / pointer.read_text().strip()) if pointer.is_file() else None
