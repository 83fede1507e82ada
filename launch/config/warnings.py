"""Settings that are valid but cannot do what they seem to ask for: warnings, not errors.

`warnings_for(cfg, vocab_size)` lists them; the trainer prints each once, on rank 0, once the config is
resolved and the data built (`vocab_size`: the size of the tokenizer it built). Each names the field,
its value, what the run does instead and how to silence it. Settings a run cannot train with at all
are TrainConfig's errors (launch/config/training.py), not these.
"""

from __future__ import annotations

from dataclasses import fields

from launch.config.training import TrainConfig
from launch.data.config import DataConfig
from launch.parallel.distributed import launched

_DATA_DEFAULTS = {f.name: f.default for f in fields(DataConfig)}


def warnings_for(cfg: TrainConfig, vocab_size: int | None = None) -> list[str]:
    """One line per setting of `cfg` that silently does less than asked; [] for the default run."""
    found = _data_warnings(cfg, vocab_size)
    if cfg.warmup_steps >= cfg.steps:
        reached = f"lr = {cfg.lr:g}" if cfg.warmup_steps == cfg.steps else \
            f"{cfg.steps}/{cfg.warmup_steps} of lr = {cfg.lr:g}"
        found.append(f"warmup_steps = {cfg.warmup_steps} >= steps = {cfg.steps}: the lr rises for the whole run, "
                     f"reaches {reached} only at the last step and never decays (min_lr_ratio has no effect); "
                     "set warmup_steps below steps")
    # Validation and checkpoints also happen at the last step, so a cadence past it gives just that one.
    if cfg.eval_every > cfg.steps:
        found.append(f"eval_every = {cfg.eval_every} > steps = {cfg.steps}: the run validates only before its "
                     "first step and after its last")
    if cfg.checkpoint_every > cfg.steps:
        found.append(f"checkpoint_every = {cfg.checkpoint_every} > steps = {cfg.steps}: the only checkpoint is "
                     "the one at the end (checkpoint_every = 0 says so without this warning)")
    if cfg.log_every > cfg.steps:
        found.append(f"log_every = {cfg.log_every} > steps = {cfg.steps}: metrics.jsonl records only the "
                     "validations and any skipped step, no training step")
    if not launched():
        for name, unused in (("zero_stage", 1), ("deepspeed_config", None)):
            if getattr(cfg, name) != unused:
                found.append(f"{name} = {getattr(cfg, name)!r} is ignored: one process trains without DeepSpeed; "
                             "launch with torchrun or deepspeed to use it")
    return found


def _data_warnings(cfg: TrainConfig, vocab_size: int | None) -> list[str]:
    data, found = cfg.data, []
    if cfg.init_from is not None:
        # The source's tokenizer is the one its weights were trained with (launch/train.py starting_point).
        for name in ("tokenizer", "vocab_size"):
            if getattr(data, name) != _DATA_DEFAULTS[name]:
                found.append(f"data.{name} = {getattr(data, name)!r} is ignored: a run with init_from uses the "
                             f"tokenizer of {cfg.init_from!r}")
    elif data.tokenizer == "bytes" and data.vocab_size != _DATA_DEFAULTS["vocab_size"]:
        found.append(f"data.vocab_size = {data.vocab_size} is ignored: data.tokenizer = 'bytes' has a fixed "
                     "vocabulary of 257")
    elif data.tokenizer == "bpe" and vocab_size is not None and vocab_size < data.vocab_size:
        source = f"data.path = {data.path!r}" if data.path else "the default corpus"
        found.append(f"data.vocab_size = {data.vocab_size} was asked, but the BPE trained on {source} has "
                     f"{vocab_size} tokens: the corpus is too small for more merges. The run uses {vocab_size}; "
                     f"give more text, or set data.vocab_size = {vocab_size} to ask for what it holds")
    if data.path is not None and data.max_bytes != _DATA_DEFAULTS["max_bytes"]:
        found.append(f"data.max_bytes = {data.max_bytes} is ignored: it caps only the default corpus, and "
                     f"data.path = {data.path!r} is given")
    return found
