"""Loss and perplexity of a trained model on a corpus: `python -m launch.eval SOURCE` (console script `kimi-eval`).

    python -m launch.eval runs/my-run                                   # the run's own validation split
    python -m launch.eval hf/my-model --data corpus/ --seq-len 512      # any corpus the trainer reads
    python -m launch.eval runs/sft-run --split train --batches 20 --out eval.json

SOURCE is what launch.checkpoint.pretrained.load_pretrained takes: a run directory (its newest good checkpoint),
one of its checkpoints, or a Hugging Face directory. The corpus goes through the trainer's pipeline
(launch/data/build.py build_data) with the model's own tokenizer, so documents (or conversations) fall into
the train and validation splits exactly as they did for the trainer, and no tokenizer is trained.

Defaults come from the run when SOURCE is one of ours (the checkpoint's manifest keeps its training
config): without --data, its data section (corpus, format, val_fraction, cache); its seq_len and
micro_batch_size. A Hugging Face directory keeps no such record: the trainer's default corpus,
seq_len min(max_seq_len, 1024), batch size 8. --data PATH starts the data section from DataConfig's
defaults, and --data.FIELD flags go on top either way.

Printed on stdout as one JSON object: loss is the mean next-token cross-entropy in nats over every
target evaluated (token-weighted, so a short last batch or a chat row with few assistant tokens
counts for what it holds); perplexity = exp(loss); bits_per_byte = the same nats / ln 2 / the UTF-8
bytes of the target tokens (special tokens count no bytes, their loss is kept), a number that
compares models with different tokenizers. On CUDA the forward runs under bf16 autocast, as the
trainer's validation does.

--out FILE refuses a file that exists unless --force: an evaluation is a result someone may quote,
and a rerun with another checkpoint or split into the same name would replace it silently
(launch.export refuses to replace files for the same reason).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
from tokenizers import pre_tokenizers

from launch.checkpoint import store as checkpoint
from launch.config.flags import ConfigArgumentParser
from launch.config.training import _section_flags
from launch.data.build import DataConfig, ValBatches, build_data
from launch.checkpoint.pretrained import load_pretrained
from launch.runtime import pick_device, run_cli
from launch.train import evaluate
from moe.config import ConfigError, from_dict
from moe.model import IGNORE_INDEX
from moe.params import count_parameters

SPLITS = ("val", "train", "all")
# DataConfig fields that choose a tokenizer: evaluation always reads with the one SOURCE kept.
TOKENIZER_FIELDS = ("tokenizer", "vocab_size")


def _parser() -> ConfigArgumentParser:
    parser = ConfigArgumentParser(prog="python -m launch.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="SOURCE", help="a run directory, one of its checkpoints, or a Hugging Face directory")
    parser.add_argument("--data", dest="data_path", metavar="PATH", help="text/JSONL/Parquet file, glob, directory or datasets name "
                        "(default: the run's corpus; the trainer's default corpus for a Hugging Face directory)")
    parser.add_argument("--split", choices=SPLITS, default="val",
                        help="the trainer's validation documents (default), its training documents, or both")
    parser.add_argument("--seq-len", type=int, metavar="N", help="default: the run's seq_len, else min(max_seq_len, 1024)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="sequences per forward; default: the run's micro_batch_size, else 8")
    parser.add_argument("--batches", type=int, metavar="N", help="evaluate the first N batches of the split; default: all of it")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--out", metavar="FILE.json", help="also write the JSON here")
    parser.add_argument("--force", action="store_true", help="let --out replace an existing file")
    parser.epilog = "Data fields: --data.FIELD VALUE, any DataConfig field but tokenizer and vocab_size (the model's tokenizer is used)."
    return parser


def parse(argv: list[str] | None) -> tuple:
    """(argparse namespace, the --data.FIELD values given); ConfigError for anything malformed."""
    args, rest = _parser().parse_known_args(argv)
    flags = {"model": {}, "data": {}}
    _section_flags(rest, flags)
    if flags["model"]:
        name = next(iter(flags["model"]))
        raise ConfigError(f"--model.{name}: evaluation runs the model as SOURCE saved it; drop the flag")
    for name in TOKENIZER_FIELDS:
        if name in flags["data"]:
            raise ConfigError(f"--data.{name} = {flags['data'][name]!r}: evaluation reads the corpus with the tokenizer "
                              "SOURCE kept (the ids its model was trained on); drop the flag")
    for name in ("seq_len", "batch_size", "batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} = {value} must be >= 1")
    if args.out is not None and Path(args.out).exists() and not args.force:
        raise ConfigError(f"--out {args.out!r} already exists; pass --force to replace it, or pick another path")
    return args, flags["data"]


def manifest_of(source: str) -> dict:
    """The manifest of checkpoint `source` (its step, its training config); {} for a Hugging Face directory."""
    return checkpoint.read_manifest(Path(source)) if (Path(source) / "manifest.json").is_file() else {}


def token_bytes(tokenizer, vocab_size: int) -> torch.Tensor | None:
    """int64 [vocab_size]: the UTF-8 bytes each id stands for (0 for special tokens and unused ids);
    None when the tokenizer is not byte-level, so its tokens name no bytes."""
    tok = tokenizer.to_tokenizers()
    special = set(tok.get_added_tokens_decoder())
    # The 256 characters ByteLevel writes bytes as: a token made of them is one byte per character.
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    table = torch.zeros(vocab_size, dtype=torch.long)
    for symbol, i in tok.get_vocab().items():
        if i in special:
            continue
        if i >= vocab_size or not alphabet.issuperset(symbol):
            return None
        table[i] = len(symbol)
    return table


def run(args, data_flags: dict) -> dict:
    start = time.perf_counter()
    device = pick_device(args.device)  # a missing GPU is known before anything is loaded
    model, tokenizer, source = load_pretrained(args.source)
    if tokenizer is None:
        raise ConfigError(f"{source} kept no tokenizer.json, so the corpus cannot be turned into the ids its model "
                          "reads; evaluate the run itself, or export it again with launch.export --hf-dir")
    manifest = manifest_of(source)
    trained = manifest.get("train_config", {})
    base = trained.get("data", {}) if args.data_path is None else {}
    values = {**base, **data_flags, **({"path": args.data_path} if args.data_path is not None else {})}
    data_cfg = from_dict(DataConfig, values, "data")
    max_len = model.cfg.max_seq_len
    seq_len = args.seq_len or trained.get("seq_len") or min(max_len, 1024)
    if seq_len > max_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds the max_seq_len = {max_len} of {source}")
    batch_size = args.batch_size or trained.get("micro_batch_size") or 8

    data = build_data(data_cfg, seq_len, tokenizer)
    examples = {"val": data.val, "train": data.train, "all": torch.cat([data.train, data.val])}[args.split]
    batches = ValBatches(examples, batch_size, args.batches or math.ceil(len(examples) / batch_size))
    model.to(device)
    byte_table = token_bytes(tokenizer, model.cfg.vocab_size)
    nats, tokens, num_bytes = 0.0, 0, 0
    for batch in batches:
        targets = batch[1][batch[1] != IGNORE_INDEX]
        # The trainer's own validation forward, one batch at a time, weighted by the targets it holds.
        nats += evaluate(model, [batch], device) * len(targets)
        tokens += len(targets)
        if byte_table is not None:
            num_bytes += int(byte_table[targets].sum())
    loss = nats / tokens
    counts = count_parameters(model)
    return {
        "source": source, "step": manifest.get("step"),
        "data": data.stats["source"], "data_path": data_cfg.path, "format": data_cfg.format, "split": args.split,
        "seq_len": seq_len, "batch_size": batch_size, "batches": len(batches), "sequences": len(batches.examples),
        "split_sequences": len(examples),
        "tokens": tokens, "loss": loss, "perplexity": math.exp(loss),
        "bits_per_byte": nats / math.log(2) / num_bytes if num_bytes else None, "bytes": num_bytes or None,
        "model": {"preset": trained.get("model", {}).get("preset"), "params_total": counts["total"],
                  "params_active": counts["active"], "vocab_size": model.cfg.vocab_size, "max_seq_len": max_len},
        "device": str(device), "seconds": round(time.perf_counter() - start, 2),
    }


def write_json(path: str, result: dict) -> None:
    """Atomically, so a reader never sees half a result."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    def command():
        args, data_flags = parse(argv)
        result = run(args, data_flags)
        if args.out is not None:
            write_json(args.out, result)
        print(json.dumps(result))

    run_cli(command)


if __name__ == "__main__":
    main()
