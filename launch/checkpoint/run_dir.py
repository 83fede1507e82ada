"""The run directory: what makes a directory a run of ours, the lock that keeps a second trainer out,
and what a resume records.

    <out_dir>/run.json                  marks a run of ours; only such a directory may be resumed
    <out_dir>/.lock                     flock-ed by rank 0 for the trainer's life; says who holds it
    <out_dir>/config.yaml               the config the run trains with (rewritten only once a resume is accepted)
    <out_dir>/config_history.jsonl      one line per start and resume: step, full config, what changed
    <out_dir>/metrics.jsonl             one record per step: a resume moves the records of the steps it
    <out_dir>/metrics.superseded.jsonl  redoes here, so readers never see a step twice

The lock is an advisory `flock` on .lock: the kernel drops it when its process dies, however it
dies, so a lock left by a killed trainer never blocks the relaunch (the file stays; only a live
holder counts). The file's text names the holder (pid, host, start time) for the refusal message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

import yaml

from launch.checkpoint import store as checkpoint
from launch.config.training import saved_run_config, timestamped_run_dir
from moe.config import ConfigError

MARKER = "run.json"
LOCK = ".lock"
KIND = "kimi-moe run"


def has_files(out: Path) -> bool:
    return out.is_dir() and any(p.name != LOCK for p in out.iterdir())


def is_ours(out: Path) -> bool:
    try:
        return json.loads((out / MARKER).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def check_usable(out: Path, resume: bool) -> bool:
    """True if `out` holds a run to resume, False if a new run starts there; ConfigError if neither
    (a directory with files that is not ours, or ours without --resume). Reads, never writes."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {str(out)!r} exists and is not a directory")
    if not has_files(out):
        return False
    if not resume:
        raise ConfigError(f"out_dir {str(out)!r} already holds files; pick another --out-dir, or add --resume to "
                          "continue that run (nothing was overwritten)")
    if not is_ours(out):
        raise ConfigError(f"out_dir {str(out)!r} holds files but is not a run of launch.train (no {MARKER}); "
                          "--resume continues only a run of ours, and nothing there was touched")
    return True


class RunLock:
    """The exclusive lock on a run directory, held from `acquire` to `release` (or the process's end)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self._fd = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown process"
            os.close(fd)
            raise ConfigError(
                f"out_dir {str(self.path.parent)!r} is in use by another trainer ({holder}); two trainers in one "
                "run would overwrite each other's checkpoints and metrics. Wait for it to end, or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                  .encode(), 0)
        self._fd = fd

    def release(self) -> None:
        # The file stays: unlinking it while another process waits on it would let two hold "the" lock.
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def mark(out: Path) -> None:
    _write_atomic(out / MARKER, json.dumps({"kind": KIND, "version": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
                  + "\n")


def write_config(out: Path, config: dict) -> None:
    _write_atomic(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))


def append_history(out: Path, record: dict) -> int:
    """Append one start/resume record; returns its attempt number (0 for the first start)."""
    path = out / "config_history.jsonl"
    attempt = sum(1 for line in path.read_text().splitlines() if line.strip()) if path.exists() else 0
    with path.open("a") as f:
        f.write(json.dumps({"attempt": attempt, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **record}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return attempt


def supersede_metrics(out: Path, start_step: int, key: str = "step") -> int:
    """Move the records of steps a resume from `start_step` redoes (every step after it; from step 0,
    all) out of metrics.jsonl into metrics.superseded.jsonl. Returns how many moved. `key` names
    the record's step counter (an RL run counts iterations)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    keep, moved = [], []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get(key, 0)
        except ValueError:
            step = None  # a torn last line of a killed attempt: not a record anyone can read
        (keep if step is not None and step <= start_step and start_step > 0 else moved).append(line)
    if moved:
        with (out / "metrics.superseded.jsonl").open("a") as f:
            f.write("".join(line + "\n" for line in moved))
            f.flush()
            os.fsync(f.fileno())
        _write_atomic(path, "".join(line + "\n" for line in keep))
    return len(moved)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class RunSetup:
    """Rank 0's side of opening the run directory: decide new run or resume, take the lock, pick the
    checkpoint. Nothing is written but the lock until `accept`, so a refused resume or a config
    error leaves the directory as it was (and a new run leaves no directory)."""

    def __init__(self, out: Path, resume: bool, ckpt_meta: dict):
        self.out, self.resume, self.meta = out, resume, ckpt_meta
        self.lock, self.created = None, False

    def open(self) -> dict:
        check_usable(self.out, self.resume)  # refuse before creating anything
        if not self.out.exists():
            self.out.mkdir(parents=True)
            self.created = True
        self.lock = RunLock(self.out)
        self.lock.acquire()
        resuming = check_usable(self.out, self.resume)  # again, now that nobody else can write
        decision = {"resuming": resuming, "ckpt": None, "damaged": [], "saved": None}
        if resuming:
            log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
            ckpt, decision["damaged"] = checkpoint.find_resumable(self.out / "checkpoints", self.meta, log=log)
            if ckpt is not None:
                manifest = checkpoint.read_manifest(ckpt)
                decision["ckpt"] = str(ckpt)
                decision["saved"] = {"train": manifest.get("train_config", {}), "model": manifest.get("model_config", {}),
                                     "step": manifest["step"], "world_size": manifest["world_size"]}
            else:  # our run, killed before its first checkpoint: it starts over, under its own config
                saved = saved_run_config(str(self.out)) or {}
                decision["saved"] = {"train": {k: v for k, v in saved.items() if k != "resolved_model"},
                                     "model": saved.get("resolved_model", {}), "step": 0}
        return decision

    def accept(self, decision: dict, config: dict, start_step: int, changes: dict) -> None:
        """The resume (or new run) is accepted: record it. Nothing before this wrote a file."""
        moved = checkpoint.set_aside(self.out / "checkpoints", decision["damaged"])
        if not decision["resuming"]:
            mark(self.out)
        superseded = supersede_metrics(self.out, start_step) if decision["resuming"] else 0
        write_config(self.out, config)
        attempt = append_history(self.out, {
            "start_step": start_step, "checkpoint": decision["ckpt"], "changed": changes,
            "superseded_metrics": superseded, "set_aside": moved, "command": sys.argv, "config": config,
        })
        for name, (old, new) in changes.items():
            print(f"resume: {name} changes from {old!r} to {new!r} (attempt {attempt})", file=sys.stderr)
        if moved:
            print(f"resume: damaged checkpoint(s) kept aside as {', '.join(moved)}", file=sys.stderr)

    def abandon(self) -> None:
        """Setup failed: leave no trace of this attempt (a directory we made holds only the lock)."""
        if self.lock is not None:
            self.lock.release()
        if self.created and not has_files(self.out):
            (self.out / LOCK).unlink(missing_ok=True)
            self.out.rmdir()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


def new_demo_dir(args, counts: tuple[str, ...], label: str) -> Path:
    """After checking that the flags `counts` are >= 1: the demo's output directory (--out-dir, else
    a timestamped one named `label`), created; an existing one is refused, nothing in it touched."""
    for name in counts:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} = {getattr(args, name)} must be >= 1")
    root = Path(args.out_dir or timestamped_run_dir(label))
    if root.exists():
        raise ConfigError(f"--out-dir {str(root)!r} exists; the demo writes a new directory (nothing was changed)")
    root.mkdir(parents=True)
    return root


def open_for_training(out: Path, resume: bool) -> dict:
    """Rank 0 of a trainer whose checkpoints need no layout check (RL, TRM: one replicated model):
    refuse an unusable directory, lock it, and find the newest good checkpoint when resuming.
    Returns {"ckpt": its path or None (a fresh start), "lock": the RunLock to release at the end}."""
    resuming = check_usable(out, resume)
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out)
    lock.acquire()
    ckpt = None
    if resuming:
        found, _ = checkpoint.find_resumable(out / "checkpoints", {}, log=lambda m: print(m, file=sys.stderr))
        ckpt = None if found is None else str(found)
    return {"ckpt": ckpt, "lock": lock}
