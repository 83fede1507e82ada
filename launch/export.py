"""Turn a training checkpoint (one process or many, any ZeRO stage, any EP size) into one model.

    python -m launch.export runs/my-run/checkpoints            # newest good checkpoint
    python -m launch.export runs/my-run/checkpoints/step_00001000 --hf-dir hf/my-model
    python -m launch.export runs/my-run/checkpoints --safetensors my-model.safetensors

`consolidate` rebuilds the single-device `Transformer` (each tensor from the pieces the shard index
names; a checkpoint of the previous format from the EP ranks' files, in expert order); `--hf-dir` then writes it in the Hugging Face DeepseekV3 format through
`moe.hf.export_hf`, loadable with `transformers.AutoModelForCausalLM.from_pretrained`.
`--safetensors` writes our own state_dict names (what `Transformer.load_state_dict` takes). Neither
output is a pickle, and neither replaces an existing file. Runs on one CPU process, no launcher.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from launch.checkpoint import store as checkpoint
from launch.parallel.state_shards import load_weights
from moe.config import ModelConfig
from moe.model import Transformer


def consolidate(ckpt: Path, check_digests: bool = True) -> Transformer:
    """The model saved in checkpoint directory `ckpt`, verified against its manifest first (every
    file's size and SHA-256; the manifest alone with `check_digests=False`, where the caller's rank 0
    has verified it)."""
    manifest = checkpoint.verify(ckpt, {}) if check_digests else checkpoint.read_manifest(ckpt)
    if "model_config" not in manifest:
        raise checkpoint.CheckpointError(f"{ckpt}/manifest.json has no model_config; it was not written by launch.train")
    model = Transformer(ModelConfig(**manifest["model_config"]))
    if "shards" in manifest:  # every tensor under its single-device name, whatever layout wrote it
        load_weights(model, checkpoint.open_shards(ckpt))
        return model
    # The previous format: each rank's whole model share, the experts split over the first EP group.
    ep_size = manifest.get("ep_size", 1)
    # Ranks 0..ep_size-1 form the first expert-parallel group: together they hold every expert.
    shards = [checkpoint.load(ckpt, rank=r, only="model") for r in range(ep_size)]
    state = {}
    for key, ref in model.state_dict().items():
        saved = shards[0].get(key)
        if saved is None:
            raise checkpoint.CheckpointError(f"{ckpt}: rank 0's model state has no {key!r}")
        if saved.shape == ref.shape:
            state[key] = saved
        elif ep_size > 1 and saved.shape[0] * ep_size == ref.shape[0] and saved.shape[1:] == ref.shape[1:]:
            state[key] = torch.cat([shard[key] for shard in shards])  # rank p holds experts [p*L, (p+1)*L)
        else:
            raise checkpoint.CheckpointError(
                f"{ckpt}: {key} has shape {tuple(saved.shape)}, the model expects {tuple(ref.shape)} (ep_size = {ep_size})"
            )
    model.load_state_dict(state)
    return model


def export_with_tokenizer(model: Transformer, ckpt: Path, hf_dir: str) -> None:
    """The Hugging Face model, plus the run's tokenizer (and the special-token ids and generation
    config it implies) when the run kept one: then `AutoTokenizer` loads the directory too."""
    from moe.hf import export_hf

    from launch.checkpoint.pretrained import run_tokenizer_file

    saved = run_tokenizer_file(ckpt)
    if not saved.is_file():
        print(f"export: {saved} does not exist (a run from before tokenizers were kept with the run); "
              "writing the model without a tokenizer", file=sys.stderr)
        export_hf(model, hf_dir)
        return
    from launch.data.tokenizer import BPETokenizer
    from posttrain.hf_tokenizer import config_token_ids, export_tokenizer

    tokenizer = BPETokenizer.load(str(saved))
    export_hf(model, hf_dir, token_ids=config_token_ids(tokenizer))
    export_tokenizer(tokenizer, hf_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", help="a step_* directory, or a checkpoints/ directory (its newest good one)")
    parser.add_argument("--hf-dir", help="write a Hugging Face model here (config.json + safetensors)")
    parser.add_argument("--safetensors", metavar="FILE", help="write the consolidated state_dict here (safetensors)")
    args = parser.parse_args(argv)
    ckpt = Path(args.checkpoint)
    # Refuse before the (possibly long) consolidation: nothing a user saved is replaced.
    if args.safetensors and Path(args.safetensors).exists():
        sys.exit(f"export: --safetensors {args.safetensors!r} already exists; nothing was written (remove it or pick another path)")
    if args.hf_dir:
        from moe.hf import check_export_dir

        try:
            check_export_dir(args.hf_dir)
        except FileExistsError as err:
            sys.exit(f"export: --hf-dir {args.hf_dir!r} exists and is not an empty directory; nothing was written ({err})")
    try:
        if not (ckpt / "manifest.json").exists():
            found, _ = checkpoint.find_resumable(ckpt, {}, log=lambda m: print(m, file=sys.stderr))
            if found is None:
                raise checkpoint.CheckpointError(f"{ckpt}: no complete checkpoint found")
            ckpt = found
        model = consolidate(ckpt)
    except checkpoint.CheckpointError as err:
        sys.exit(f"export: {err}")
    if args.safetensors:
        tmp = Path(args.safetensors + ".tmp")
        state = model.state_dict()
        if model.cfg.tie_embeddings:  # safetensors refuses two names for one tensor; keep both keys loadable
            state["lm_head.weight"] = state["lm_head.weight"].clone()
        save_file(state, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, args.safetensors)
    if args.hf_dir:
        export_with_tokenizer(model, ckpt, args.hf_dir)
    print(json.dumps({"checkpoint": str(ckpt), "hf_dir": args.hf_dir, "safetensors": args.safetensors}))


if __name__ == "__main__":
    main()
