"""`python -m trm.train` settings: defaults <- --config FILE <- flags, as launch.train and posttrain.rl.

Every field's one-line doc is its --help text (launch/config/cli_help.py). A run writes its resolved config
to <out_dir>/config.yaml, itself a valid --config; with --resume that file is the base.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from launch.config.flags import flat_parser, parse_flat
from moe.config import ConfigError, check_field_types, doc_field as _f
from trm.config import PRESETS


PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TRMRunConfig:
    preset: str = _f("tiny-sudoku-mlp", "model preset (trm/config.py): " + ", ".join(PRESETS))
    model: dict = _f({}, "TRMConfig fields over the preset's, e.g. {T: 1, n: 1} (vocab_size, seq_len: from the data)")
    task: str = _f("sudoku", "puzzle task (trm/data/__init__.py): sudoku, maze, arc")
    task_args: dict = _f({}, "keyword arguments of the task's data builder, e.g. {size: 6, train: 2000}")
    augment: bool = _f(True, "a fresh validity-preserving augmentation of every training example drawn")
    out_dir: str | None = _f(None, "run directory to write; None: runs/trm-<time>")
    resume: bool = _f(False, "continue the run in --out-dir from its newest good checkpoint")
    seed: int = _f(0, "seed of the data, the model's initialisation and the draws")
    device: str = _f("auto", "auto | cpu | cuda")
    precision: str = _f("auto", "auto | fp32 | bf16: bf16 runs the model's forward under torch.autocast (the reference "
                                "code's bf16 forward); weights, optimizer, EMA, carried state and losses stay fp32; "
                                "auto: bf16 on CUDA, fp32 on CPU")
    optimizer: str = _f("adamw", "optimizer from optim's registry (adamw as the paper; muon, muonclip are ours)")
    lr: float = _f(1e-4, "peak learning rate (the paper's 1e-4)")
    weight_decay: float = _f(1.0, "decoupled weight decay (the paper: 1.0 for Sudoku, 0.1 for ARC and Maze)")
    optimizer_args: dict = _f({"betas": [0.9, 0.95]}, "extra keyword arguments of optim.build")
    puzzle_emb_lr: float = _f(1e-2, "lr of the puzzle embeddings (ARC), AdamW with no weight decay: each id is "
                                    "seen rarely, so it learns at its own, higher rate (the paper's 1e-2)")
    warmup_steps: int = _f(100, "steps of linear warmup, then a constant lr (the paper's schedule)")
    grad_clip: float = _f(1.0, "max global gradient norm; 0 disables clipping")
    batch_size: int = _f(64, "slots per process: examples in progress at once (deep supervision); under torchrun the "
                                    "batch is processes x batch_size")
    steps: int = _f(2000, "optimizer steps (one per supervision step of the batch)")
    time_budget_s: float = _f(0.0, "stop after this many seconds of training (same-compute ablations); 0: off")
    ema: float = _f(0.999, "decay of the weights' EMA, used for evaluation; 0: evaluate the raw weights")
    eval_every: int = _f(250, "steps between validation evaluations (and at the last step)")
    eval_batch_size: int = _f(256, "examples per evaluation batch")
    log_every: int = _f(10, "steps between training records in metrics.jsonl")
    checkpoint_every: int = _f(500, "steps between checkpoints (and at the last step); 0: only the last")
    keep_checkpoints: int = _f(2, "newest complete checkpoints kept; 0 keeps all")
    tensorboard: bool = _f(True, "also write TensorBoard events in <out_dir>/tensorboard/")
    wandb: bool = _f(False, "also log to an offline W&B run (needs the wandb package)")

    def __post_init__(self):
        check_field_types(self)
        if self.preset not in PRESETS:
            raise ConfigError(f"TRMRunConfig.preset = {self.preset!r}; valid: {', '.join(PRESETS)}")
        for name in ("batch_size", "steps", "eval_every", "eval_batch_size", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"TRMRunConfig.{name} = {getattr(self, name)} must be >= 1")
        for name in ("lr", "puzzle_emb_lr", "weight_decay", "warmup_steps", "grad_clip", "time_budget_s", "checkpoint_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TRMRunConfig.{name} = {getattr(self, name)} must be >= 0")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"TRMRunConfig.ema = {self.ema} must be in [0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"TRMRunConfig.device = {self.device!r}; valid: auto, cpu, cuda")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"TRMRunConfig.precision = {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.resume and self.out_dir is None:
            raise ConfigError("resume = true needs out_dir: the run directory to continue (--out-dir)")
        for name in ("model", "task_args", "optimizer_args"):
            bad = [k for k in getattr(self, name) if not isinstance(k, str) or not k.isidentifier()]
            if bad:
                raise ConfigError(f"{name} key {bad[0]!r} is not a field name")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


HELP = ("python -m trm.train", "Train a Tiny Recursive Model (recursion on a latent state, deep supervision, "
        "adaptive halting, weight EMA) on generated puzzles; evaluates on a validation split, and the test split once "
        "at the end with the weights that scored best on validation.")


def build_parser() -> argparse.ArgumentParser:
    return flat_parser(TRMRunConfig, HELP)


def parse(argv: list[str] | None = None, defaults: dict | None = None) -> TRMRunConfig:
    """Defaults <- --config file <- flags; with --resume, the run's saved config.yaml is the base."""
    return parse_flat(TRMRunConfig, build_parser(), argv, defaults)
