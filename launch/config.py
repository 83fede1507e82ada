"""Training configuration: a typed dataclass, filled from defaults, then a YAML/TOML file, then flags.

Layout of a config file (every key optional):

    model: {preset: small, num_layers: 4}   # a preset from moe.config plus field overrides
    data: {path: ./my_corpus/, vocab_size: 8192}
    steps: 200
    lr: 3.0e-3
    optimizer: adamw

Every top-level field is also a flag (`--steps 300`, `--micro-batch-size 8`); sections take dotted
flags (`--model.num_layers 4`, `--data.vocab_size 8192`); `--model NAME` picks the preset and
`--data PATH` the corpus. The resolved config is written to `<out_dir>/config.yaml` by the trainer.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
import tomllib
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from launch.data import DataConfig
from moe.config import ConfigError, ModelConfig, check_field_types, from_dict, preset


@dataclass
class TrainConfig:
    # Model: `preset` names a moe.config preset, every other key overrides one of its fields.
    model: dict = field(default_factory=lambda: {"preset": "small"})
    data: DataConfig = field(default_factory=DataConfig)
    # Optimisation. `optimizer` is a name from optim's registry or a dotted torch.optim path.
    optimizer: str = "adamw"
    lr: float = 3e-3
    weight_decay: float = 0.1
    optimizer_args: dict = field(default_factory=dict)  # extra keyword arguments for optim.build
    warmup_steps: int = 30
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at the last step
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    # Schedule and batch: tokens per optimizer step = micro_batch_size * grad_accum * seq_len (* data-parallel size).
    steps: int = 200
    micro_batch_size: int = 16
    grad_accum: int = 1
    seq_len: int = 256
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 1
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda
    out_dir: str | None = None  # default: runs/<preset>-<timestamp>
    # Checkpoints and faults (launch/checkpoint.py). checkpoint_every 0: only at the end.
    checkpoint_every: int = 100
    keep_checkpoints: int = 3  # newest complete checkpoints kept; 0 keeps all
    resume: bool = False  # continue from the newest good checkpoint in out_dir (a fresh start if none)
    max_skipped_steps: int = 5  # consecutive non-finite steps tolerated before the run stops
    # Under a launcher (torchrun / deepspeed): DeepSpeed ZeRO stage, expert-parallel size, collective timeout.
    zero_stage: int = 1
    ep_size: int = 1
    deepspeed_config: str | None = None  # a DeepSpeed JSON to start from; ours is written to out_dir
    dist_timeout_s: float = 600.0

    def __post_init__(self):
        if isinstance(self.data, dict):
            self.data = from_dict(DataConfig, self.data, "data")
        check_field_types(self)
        if "preset" in self.model and not isinstance(self.model["preset"], str):
            raise ConfigError(f"model.preset = {self.model['preset']!r} must be a preset name")
        for name in ("steps", "micro_batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches", "log_every"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"TrainConfig.{name} = {getattr(self, name)} must be > 0")
        for name in ("lr", "weight_decay", "grad_clip", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} = {getattr(self, name)} must be >= 0")
        for name in ("checkpoint_every", "keep_checkpoints", "max_skipped_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} = {getattr(self, name)} must be >= 0")
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"TrainConfig.zero_stage = {self.zero_stage}; valid: 1, 2, 3")
        if self.ep_size < 1:
            raise ConfigError(f"TrainConfig.ep_size = {self.ep_size} must be >= 1")
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"TrainConfig.dist_timeout_s = {self.dist_timeout_s} must be > 0")
        if self.resume and self.out_dir is None:
            raise ConfigError("resume = true needs out_dir: the run directory to continue (--out-dir)")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"TrainConfig.min_lr_ratio = {self.min_lr_ratio} must be in [0, 1]")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"TrainConfig.device = {self.device!r}; valid: auto, cpu, cuda")
        self.model_config(vocab_size=None)  # fail now, not after the data is built

    def model_config(self, vocab_size: int | None) -> ModelConfig:
        """The ModelConfig this run trains. vocab_size (the tokenizer's) fills the model's unless the
        user set one explicitly, which must then be large enough."""
        overrides = {k: v for k, v in self.model.items() if k != "preset"}
        name = self.model.get("preset", "small")
        if vocab_size is not None:
            if "vocab_size" not in overrides:
                overrides["vocab_size"] = vocab_size
            elif overrides["vocab_size"] < vocab_size:
                raise ConfigError(
                    f"model.vocab_size = {overrides['vocab_size']} is smaller than the tokenizer's vocabulary ({vocab_size})"
                )
        cfg = preset(name, **overrides)
        if self.seq_len > cfg.max_seq_len:
            raise ConfigError(f"seq_len = {self.seq_len} exceeds model.max_seq_len = {cfg.max_seq_len}")
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    text = p.read_text()
    if p.suffix in (".yaml", ".yml"):
        values = yaml.safe_load(text) or {}
    elif p.suffix == ".toml":
        values = tomllib.loads(text)
    else:
        raise ConfigError(f"config file {path!r}: unsupported extension {p.suffix!r}; use .yaml, .yml or .toml")
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path!r} must hold a table of fields, got {type(values).__name__}")
    return values


def _parse_value(text: str, hint, where: str):
    """Turn a flag's string into the annotated type: YAML rules, so `1e-3`, `true`, `null`, `[1, 2]` work."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if hint is str or hint == (str | None):
        return text if value is not None or text.lower() not in ("null", "none", "~") else None
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if value is None and text.lower() not in ("null", "none", "~"):
        raise ConfigError(f"{where}: could not read {text!r}")
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m launch.train",
        description="Train a Kimi-K2-style MoE. With no arguments: the `small` preset on the Python "
        "standard library's source, on CPU in a few minutes.",
    )
    parser.add_argument("--config", help="YAML or TOML file with fields of TrainConfig")
    parser.add_argument("--model", dest="model_preset", help="model preset (tiny, small, k2-2b, kimi-k2)")
    parser.add_argument("--data", dest="data_path", help="text/JSONL/Parquet file, glob, directory or datasets name")
    # The deepspeed launcher appends --local_rank=N; the rank is read from LOCAL_RANK, as under torchrun.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    hints = typing.get_type_hints(TrainConfig)
    for f in fields(TrainConfig):
        if f.name in ("model", "data"):
            continue
        # A bare boolean flag means true (`--resume`); `--resume false` still works.
        flag_bool = {"nargs": "?", "const": "true"} if hints[f.name] is bool else {}
        parser.add_argument(_flag(f.name), dest=f.name, metavar=_type_label(hints[f.name]), default=argparse.SUPPRESS,
                            **flag_bool)
    parser.epilog = "Section fields: --model.FIELD VALUE (any ModelConfig field), --data.FIELD VALUE (any DataConfig field)."
    return parser


def _type_label(hint) -> str:
    return getattr(hint, "__name__", str(hint)).upper()


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Defaults <- --config file <- flags. Unknown keys and wrong types raise ConfigError."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    values = load_file(args.config) if args.config else {}
    unknown = sorted(set(values) - {f.name for f in fields(TrainConfig)})
    if unknown:
        raise ConfigError(
            f"unknown key {unknown[0]!r} in {args.config}; valid keys: {', '.join(f.name for f in fields(TrainConfig))}"
        )
    values.setdefault("model", {"preset": "small"})
    values["model"] = dict(values["model"])
    data = dict(values.get("data") or {})
    hints = typing.get_type_hints(TrainConfig)
    for name, value in vars(args).items():
        if name in hints:
            values[name] = _parse_value(value, hints[name], _flag(name))
    if args.model_preset:
        values["model"]["preset"] = args.model_preset
    if args.data_path:
        data["path"] = args.data_path
    _apply_section_flags(rest, values["model"], data, parser)
    values["data"] = data
    return TrainConfig(**values)


def _apply_section_flags(rest: list[str], model: dict, data: dict, parser) -> None:
    model_hints = typing.get_type_hints(ModelConfig)
    data_hints = typing.get_type_hints(DataConfig)
    i = 0
    while i < len(rest):
        token = rest[i]
        if "=" in token:
            key, value = token.split("=", 1)
            i += 1
        elif i + 1 < len(rest):
            key, value = token, rest[i + 1]
            i += 2
        else:
            parser.error(f"unrecognized argument: {token}")
        section, _, name = key.lstrip("-").partition(".")
        name = name.replace("-", "_")
        if section == "model" and name in model_hints:
            model[name] = _parse_value(value, model_hints[name], key)
        elif section == "data" and name in data_hints:
            data[name] = _parse_value(value, data_hints[name], key)
        elif section in ("model", "data"):
            valid = model_hints if section == "model" else data_hints
            raise ConfigError(f"unknown flag {key}: {section} has no field {name!r}; valid: {', '.join(sorted(valid))}")
        else:
            parser.error(f"unrecognized argument: {token}")


def default_out_dir(cfg: TrainConfig) -> str:
    root = os.environ.get("KIMI_MOE_RUNS", "runs")
    return os.path.join(root, f"{cfg.model.get('preset', 'small')}-{time.strftime('%Y%m%d-%H%M%S')}")
