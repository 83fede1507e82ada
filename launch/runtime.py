"""What every command's process shares, whichever trainer it runs (launch.train, posttrain.rl, trm.train,
launch.eval, launch.report): the device it runs on, bf16 autocast, rank 0 deciding for every rank,
the start of a trainer that replicates its model, and the one-line exit for errors a user can fix.
Kept apart from launch/train.py so the other trainers need not import the LM trainer to start."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

from launch.checkpoint import run_dir
from launch.checkpoint import store as checkpoint
from launch.config.training import timestamped_run_dir
from launch.parallel.distributed import DistInfo, init_distributed, launched
from moe.config import ConfigError


class TrainingFailed(RuntimeError):
    """The run trained but did not succeed (non-finite steps): the message says where it stands."""


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = 'cuda' but no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, info: DistInfo | None = None):
    # bf16 autocast on one GPU (weights and optimizer state stay fp32); plain fp32 on CPU. Under
    # DeepSpeed on GPU the engine keeps bf16 weights with fp32 masters itself: no autocast.
    if device.type == "cuda" and info is None:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def on_main(info: DistInfo | None, fn):
    """fn() on rank 0; its result, or the ConfigError / CheckpointError it raised, on every rank."""
    result, error = None, None
    if info is None or info.is_main:
        try:
            result = fn()
        except (ConfigError, checkpoint.CheckpointError) as err:
            error = err
    if info is not None:
        shared = [result, None if error is None else (isinstance(error, checkpoint.CheckpointError), str(error))]
        torch.distributed.broadcast_object_list(shared, src=0)
        result = shared[0]
        if shared[1] is not None and error is None:
            error = (checkpoint.CheckpointError if shared[1][0] else ConfigError)(shared[1][1])
    if error is not None:
        raise error
    return result


@contextlib.contextmanager
def replicated_run(device_name: str, out_dir: str | None, resume: bool, label: str, timeout_s: float):
    """The start of a trainer that replicates its model on every rank (RL, TRM): pick the device, join
    the process group under a launcher, name the run directory (default: runs/<label>-<time>), and on
    rank 0 refuse an unusable one, lock it and find the checkpoint to resume from. Yields
    (info, device, out, ckpt) and releases the lock when the block ends, however it ends."""
    device = pick_device(device_name)
    info = None
    if launched():
        info = init_distributed(device, 1, timeout_s)
        if device.type == "cuda":
            device = torch.device("cuda", info.local_rank)
    out = Path(on_main(info, lambda: out_dir or timestamped_run_dir(label)))
    opened = {}

    def open_run():
        opened.update(run_dir.open_for_training(out, resume))
        return opened["ckpt"]

    ckpt = on_main(info, open_run)
    try:
        yield info, device, out, ckpt
    finally:
        if "lock" in opened:
            opened["lock"].release()


def run_cli(command) -> None:
    """command(), with the errors a user can fix turned into one line and exit status 1."""
    try:
        command()
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    except checkpoint.CheckpointError as err:
        sys.exit(f"checkpoint error: {err}")
    except TrainingFailed as err:
        sys.exit(f"training failed: {err}")
    close_process_group()


def close_process_group() -> None:
    """After a successful run under a launcher: wait for every rank, then take the process groups
    down before the interpreter exits. Left to interpreter shutdown, a rank could exit while a
    peer's gloo worker threads were still live, and that peer aborted in C++ ("terminate called
    without an active exception", SIGABRT) after training had finished. Error paths skip this: a
    barrier there could wait on a rank that is gone."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
