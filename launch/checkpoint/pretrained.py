"""A trained model and the tokenizer its ids mean, from what a user points at on disk.

    model, tokenizer, where = load_pretrained("runs/small-20261201-120000")   # a run: its newest good checkpoint
    load_pretrained("runs/my-run/checkpoints/step_00000200")                # one checkpoint of a run
    load_pretrained("hf/my-model")                                          # a Hugging Face DeepseekV3 directory

SFT starts from it (`--init-from`), generation and evaluation load it. Nothing here unpickles:
checkpoints are read through launch/checkpoint/store.py (JSON + safetensors, verified against their
manifest first), Hugging Face directories through moe.hf.import_hf (safetensors). The model comes
back in fp32 on the CPU, in eval mode; the tokenizer is None when the source kept none (a run from
before tokenizers were kept with the run, an export without tokenizer files).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

from launch.checkpoint import run_dir
from launch.checkpoint import store as checkpoint
from launch.data.tokenizer import BPETokenizer
from moe.config import ConfigError
from moe.model import Transformer


class Pretrained(NamedTuple):
    model: Transformer
    tokenizer: BPETokenizer | None
    source: str  # the checkpoint or directory actually read, for logs and run records


def _tokenizer(path: Path) -> BPETokenizer | None:
    return BPETokenizer.load(str(path)) if path.is_file() else None


def run_tokenizer_file(ckpt: Path) -> Path:
    """The tokenizer.json a run keeps beside its checkpoints: <run>/checkpoints/step_N -> <run>/tokenizer.json."""
    return Path(ckpt).parent.parent / "tokenizer.json"


def _from_checkpoint(ckpt: Path) -> Pretrained:
    from launch.export import consolidate

    model = consolidate(ckpt).eval()
    return Pretrained(model, _tokenizer(run_tokenizer_file(ckpt)), str(ckpt))


def load_pretrained(path: str) -> Pretrained:
    """The model at `path`: a run directory, a checkpoints/ directory, one step_* checkpoint, or a
    Hugging Face directory (config.json + safetensors). ConfigError when it is none of these, or a
    CheckpointError when a run holds no usable checkpoint."""
    where = Path(path).expanduser()
    if not where.is_dir():
        raise ConfigError(f"{path!r} is not a directory; give a run directory, a checkpoint or a Hugging Face directory")
    if (where / "manifest.json").is_file():
        return _from_checkpoint(where)
    if run_dir.is_ours(where) or where.name == "checkpoints":
        root = where / "checkpoints" if run_dir.is_ours(where) else where
        found, damaged = checkpoint.find_resumable(root, {}, log=lambda m: print(m, file=sys.stderr))
        if found is None:
            raise checkpoint.CheckpointError(f"{root}: no complete checkpoint to load (has the run saved one yet?)")
        return _from_checkpoint(found)
    if (where / "config.json").is_file():
        from moe.hf import import_hf

        try:
            model = import_hf(where).eval()
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from None
        return Pretrained(model, _tokenizer(where / "tokenizer.json"), str(where))
    raise ConfigError(
        f"{path!r} holds no run of ours (run.json), no checkpoint (manifest.json) and no Hugging Face model "
        "(config.json); give a run directory, one of its checkpoints, or an exported --hf-dir"
    )
