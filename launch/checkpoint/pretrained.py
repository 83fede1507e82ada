"""A trained model and the tokenizer its ids mean, from what a user points at on disk.

    model, tokenizer, where = load_pretrained("runs/small-20261201-120000")   # a run: its newest good checkpoint
    load_pretrained("runs/my-run/checkpoints/step_00000200")                # one checkpoint of a run
    load_pretrained("hf/my-model")                                          # a Hugging Face DeepseekV3 directory

SFT starts from it (`--init-from`), generation and evaluation load it. Nothing here unpickles:
checkpoints are read through launch/checkpoint/store.py (JSON + safetensors, verified against their
manifest first), Hugging Face directories through moe.hf.import_hf (safetensors). The model comes
back in fp32 on the CPU, in eval mode; the tokenizer is None when the source kept none (a run from
before tokenizers were kept with the run, an export without tokenizer files).

A trainer that holds only part of the model (`launch.train` under --pp-size / --ep-size) asks
`part_source` instead: the config and tokenizer of one of our checkpoints or of a Hugging Face
directory, whose tensors it then reads for its own part alone (`PartSource.load_into`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import NamedTuple

from launch.checkpoint import run_dir
from launch.checkpoint import store as checkpoint
from launch.data.tokenizer import BPETokenizer
from moe.config import ConfigError, ModelConfig
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


def _from_checkpoint(ckpt: Path, check_digests: bool) -> Pretrained:
    from launch.export import consolidate

    model = consolidate(ckpt, check_digests).eval()
    return Pretrained(model, _tokenizer(run_tokenizer_file(ckpt)), str(ckpt))


def locate(path: str) -> tuple[str, Path, bool]:
    """("checkpoint", a step_* checkpoint directory, verified) or ("hf", a Hugging Face directory,
    False) for what `path` names: a run directory (its newest good checkpoint), a checkpoints/
    directory, one checkpoint, or a Hugging Face directory (config.json + safetensors). ConfigError
    when it is none of these, or a CheckpointError when a run holds no usable checkpoint. `verified`
    says every file of the checkpoint was hashed against its manifest here: finding a run's newest
    good checkpoint verifies it, so the caller need not read it all again. One named directly is not."""
    where = Path(path).expanduser()
    if not where.is_dir():
        raise ConfigError(f"{path!r} is not a directory; give a run directory, a checkpoint or a Hugging Face directory")
    if (where / "manifest.json").is_file():
        return "checkpoint", where, False
    if run_dir.is_ours(where) or where.name == "checkpoints":
        root = where / "checkpoints" if run_dir.is_ours(where) else where
        found, damaged = checkpoint.find_resumable(root, {}, log=lambda m: print(m, file=sys.stderr))
        if found is None:
            raise checkpoint.CheckpointError(f"{root}: no complete checkpoint to load (has the run saved one yet?)")
        return "checkpoint", found, True
    if (where / "config.json").is_file():
        return "hf", where, False
    raise ConfigError(
        f"{path!r} holds no run of ours (run.json), no checkpoint (manifest.json) and no Hugging Face model "
        "(config.json); give a run directory, one of its checkpoints, or an exported --hf-dir"
    )


def verify_source(path: str) -> str:
    """Where `path`'s weights are (as `locate` finds them), after checking every file of a checkpoint
    against its manifest's sizes and SHA-256: what rank 0 of a job runs once, so that every rank can
    then read that very checkpoint with `check_digests=False` (hashing on every rank would read the
    whole source once per rank; at K2's size that is terabytes each). A Hugging Face directory has no
    digests to check; its config and tensor headers are checked where it is read."""
    kind, where, verified = locate(path)
    if kind == "checkpoint" and not verified:
        checkpoint.verify(where, {})
    return str(where)


class PartSource(NamedTuple):
    """A source a rank holding part of the model reads its part from: our sharded checkpoint or a
    Hugging Face directory, checked, its weights still on disk."""
    cfg: ModelConfig
    tokenizer: BPETokenizer | None
    where: Path  # the step_* checkpoint or the Hugging Face directory
    kind: str  # "checkpoint" or "hf"

    def load_into(self, module) -> None:
        """Fill `module` (a Transformer or part of one under its names: a pipeline stage, an
        expert-parallel slice) with the source's values for the tensors it holds, read alone."""
        if self.kind == "checkpoint":
            from launch.parallel.state_shards import load_weights

            load_weights(module, checkpoint.open_shards(self.where))
        else:
            from moe.hf import load_hf_part

            load_hf_part(module, self.where, self.cfg)


def part_source(path: str, check_digests: bool = True) -> PartSource | None:
    """What `path` names, checked but without its weights, for a trainer that holds only part of the
    model (a pipeline stage, a slice of the experts) and reads only that part: one of our sharded
    checkpoints (verified against its manifest) or a Hugging Face directory (config.json and tensor
    headers checked as import_hf checks them). None for a checkpoint of the previous format, which
    load_pretrained reads whole. `check_digests=False` checks a checkpoint's manifest, not its files'
    SHA-256: for the ranks of a job whose rank 0 has verified that very checkpoint (hashing every
    file on every rank would read the whole checkpoint once per rank)."""
    kind, where, verified = locate(path)
    if kind == "hf":
        from moe.hf import read_hf_config

        try:
            cfg = read_hf_config(where)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(str(err)) from None
        return PartSource(cfg, _tokenizer(where / "tokenizer.json"), where, "hf")
    manifest = checkpoint.verify(where, {}) if check_digests and not verified else checkpoint.read_manifest(where)
    if "shards" not in manifest or "model_config" not in manifest:
        return None
    return PartSource(ModelConfig(**manifest["model_config"]), _tokenizer(run_tokenizer_file(where)), where, "checkpoint")


def load_pretrained(path: str, check_digests: bool = True) -> Pretrained:
    """The model at `path`: a run directory, a checkpoints/ directory, one step_* checkpoint, or a
    Hugging Face directory (config.json + safetensors). ConfigError when it is none of these, or a
    CheckpointError when a run holds no usable checkpoint. `check_digests=False` as for `part_source`:
    on the ranks of a job whose rank 0 has run `verify_source` on `path`."""
    kind, where, verified = locate(path)
    if kind == "checkpoint":
        return _from_checkpoint(where, check_digests and not verified)
    from moe.hf import import_hf

    try:
        model = import_hf(where).eval()
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    return Pretrained(model, _tokenizer(where / "tokenizer.json"), str(where))
