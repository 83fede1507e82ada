"""Training configuration: a typed dataclass, filled from defaults, then a YAML/TOML file, then flags.

Layout of a config file (every key optional):

    model: {preset: small, num_layers: 4}   # a preset from moe.config plus field overrides
    data: {path: ./my_corpus/, vocab_size: 8192}
    steps: 200
    lr: 1e-3
    optimizer: adamw

Every top-level field is also a flag (`--steps 300`, `--micro-batch-size 8`); sections take dotted
flags (`--model.num_layers 4`, `--data.vocab_size 8192`); `--model NAME` picks the preset and
`--data PATH` the corpus. Values are read by YAML rules with two changes from PyYAML's YAML 1.1:
floats follow YAML 1.2 (`1e-3`, `1E5`, `.5e-2` are numbers, not strings), and a key written twice
in one table is an error, not last-wins (launch/config/files.py). Every float must be finite.

The resolved config is written to `<out_dir>/config.yaml` by the trainer, with `resolved_model`:
the complete ModelConfig the run trained. That file is a valid `--config`. When a config has
`resolved_model`, the model is built from it alone, every field, so a later change to a preset
cannot change a saved run: `model.preset` is then only the run's label, a `model.FIELD` given
beside it must equal `resolved_model.FIELD`, and `--model NAME` must name the file's own preset.
The tokenizer's vocabulary must fit `resolved_model.vocab_size`. To build a new model from a
saved run's settings, delete `resolved_model` from the file.

`parse_overrides(argv)` returns only what a command gives (its file, then its flags), so a resume
can tell the user's changes from the run's saved settings; `parse_args(argv)` fills in the
defaults and validates. `from_dict(TrainConfig, values)` builds a config from a nested dict.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path

from launch.config import cli_help
from launch.config.cli_help import flag
from launch.config.files import load_file
from launch.config.flags import ConfigArgumentParser, parse_value
from launch.data.config import DataConfig
from launch.parallel.recompute import MODES as RECOMPUTE_MODES
from moe.config import (PRESETS, ConfigError, ModelConfig, check_field_types, check_keys, check_value, doc_field,
                        from_dict, preset)

DEFAULT_PRESET = "small"

@dataclass
class TrainConfig:
    model: dict = doc_field({"preset": DEFAULT_PRESET}, "the model: a preset (listed below) and overrides of "
                                                        "its fields (--model.FIELD VALUE)")
    init_from: str | None = doc_field(None, "a run directory, one of its checkpoints, or a Hugging Face directory: "
                                            "start from its weights, model and tokenizer (fine-tuning, SFT); model "
                                            "then only labels the run")
    data: DataConfig = field(default_factory=DataConfig, metadata={"doc": "the corpus and its tokenizer (launch/data/build.py)"})
    # Optimisation
    optimizer: str = doc_field("adamw", "a name from optim's registry (listed below) or a dotted torch.optim path "
                                        "such as torch.optim.SGD")
    lr: float = doc_field(3e-3, "peak learning rate, reached at the end of warmup")
    weight_decay: float = doc_field(0.1, "decoupled weight decay")
    optimizer_args: dict = doc_field({}, "extra keyword arguments of optim.build, e.g. {qk_clip_tau: 50} (each "
                                         "optimizer's keys are listed below)")
    warmup_steps: int = doc_field(30, "steps of linear warmup from 0 to lr")
    min_lr_ratio: float = doc_field(0.1, "the cosine after warmup decays to lr * min_lr_ratio at the last step")
    grad_clip: float = doc_field(1.0, "max global gradient norm; 0 disables clipping")
    # Schedule and batch: tokens per optimizer step = micro_batch_size * grad_accum * seq_len (* data-parallel size).
    steps: int = doc_field(200, "optimizer steps to train")
    micro_batch_size: int = doc_field(16, "sequences per forward/backward on each process (also per validation batch)")
    grad_accum: int = doc_field(1, "micro-batches per optimizer step")
    seq_len: int = doc_field(256, "tokens per sequence")
    eval_every: int = doc_field(50, "steps between validations (there is one before the first step and one after "
                                    "the last)")
    eval_batches: int = doc_field(8, "batches of micro_batch_size sequences per validation")
    log_every: int = doc_field(1, "steps between metrics.jsonl records (validations and skipped steps are always "
                                  "written)")
    # Where each record's scalars also go (launch/metrics/log.py); metrics.jsonl is written either way.
    tensorboard: bool = doc_field(True, "also write the logged scalars as TensorBoard events in out_dir/tensorboard")
    wandb: bool = doc_field(False, "also log them to an offline Weights & Biases run in out_dir/wandb (needs the "
                                   "wandb package)")
    seed: int = doc_field(1234, "seed of the initial weights and the data order")
    device: str = doc_field("auto", "auto | cpu | cuda")
    out_dir: str | None = doc_field(None, "run directory to write; None: runs/<preset>-<time>, or runs/sft-<time> "
                                          "for chat data ($KIMI_MOE_RUNS in place of runs)")
    # Checkpoints and faults (launch/checkpoint/store.py)
    checkpoint_every: int = doc_field(100, "steps between checkpoints (and one at the end); 0: only at the end")
    keep_checkpoints: int = doc_field(3, "newest complete checkpoints kept; 0 keeps all")
    resume: bool = doc_field(False, "continue from the newest good checkpoint in out_dir (a fresh start if none)")
    max_skipped_steps: int = doc_field(5, "consecutive non-finite steps tolerated before the run stops")
    recompute: str = doc_field("none", "activation recomputation: none | selective (norms, SwiGLU, MLA's kv "
                                       "up-projection; K2's choice) | full (each block); gradients are unchanged")
    loss_chunk_tokens: int = doc_field(0, "compute the loss this many tokens at a time, so the [tokens, vocab] "
                                          "logits are never held whole (moe/loss.py); 0: whole")
    # Under a launcher (torchrun / deepspeed); one process trains without DeepSpeed and ignores them.
    zero_stage: int = doc_field(1, "DeepSpeed ZeRO stage under a launcher: 1, 2 or 3 (3: AdamW only)")
    ep_size: int = doc_field(1, "expert-parallel size under a launcher: consecutive ranks that split each MoE "
                                "layer's routed experts")
    pp_size: int = doc_field(1, "pipeline-parallel stages under a launcher (DeepSpeed's pipeline engine, 1F1B): "
                                "world / pp consecutive ranks per stage, blocks balanced by parameters; "
                                "ZeRO-1 with AdamW, Muon or MuonClip (qk_clip_remeasure false) for now")
    deepspeed_config: str | None = doc_field(None, "a DeepSpeed JSON to start from (under a launcher); the one "
                                                   "used is written to out_dir")
    dist_timeout_s: float = doc_field(600.0, "seconds a collective may wait under a launcher before the run stops")
    resolved_model: dict | None = doc_field(None, "every ModelConfig field of a saved run; when set, the model is "
                                                  "exactly this (launch/config/training.py's docstring)")

    def __post_init__(self):
        if isinstance(self.data, dict):
            self.data = from_dict(DataConfig, self.data, "data")
        check_field_types(self)
        self._check_model()
        self._check_optimizer_args()
        for names, ok, valid in _RANGES:
            for name in names:
                if not ok(getattr(self, name)):
                    raise ConfigError(f"TrainConfig.{name} = {getattr(self, name)} must be {valid}")
        if self.zero_stage not in (1, 2, 3):
            raise ConfigError(f"TrainConfig.zero_stage = {self.zero_stage}; valid: 1, 2, 3")
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"TrainConfig.recompute = {self.recompute!r}; valid: {', '.join(RECOMPUTE_MODES)}")
        if self.pp_size > 1:
            self._check_pipeline()
        if self.resume and self.out_dir is None:
            raise ConfigError("resume = true needs out_dir: the run directory to continue (--out-dir)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"TrainConfig.device = {self.device!r}; valid: auto, cpu, cuda")
        if self.init_from is not None:
            self._check_init_from()
        else:
            self.model_config(vocab_size=None)  # fail now, not after the data is built

    def _check_init_from(self) -> None:
        if not self.init_from:
            raise ConfigError("init_from is empty; give a run directory, a checkpoint or a Hugging Face directory")
        fields_given = sorted(set(self.model) - {"preset"})
        if fields_given and self.resolved_model is None:
            raise ConfigError(
                f"model.{fields_given[0]} is given with init_from = {self.init_from!r}: a run that starts from "
                "trained weights trains their model as it is; drop the model fields"
            )

    def _check_pipeline(self) -> None:
        """What pipeline parallelism does not do yet is refused here, before any work."""
        if self.optimizer not in ("adamw", "muon", "muonclip"):
            raise ConfigError(f"TrainConfig.pp_size = {self.pp_size} needs optimizer 'adamw', 'muon' or 'muonclip', "
                              f"got {self.optimizer!r}")
        if self.optimizer == "muonclip" and self.optimizer_args.get("qk_clip_remeasure", True):
            # Refused rather than quietly switched off: the run would otherwise clip less exactly than asked.
            raise ConfigError(
                f"TrainConfig.pp_size = {self.pp_size} with optimizer 'muonclip' needs optimizer_args."
                f"qk_clip_remeasure = false, got {self.optimizer_args.get('qk_clip_remeasure', True)!r} (true is the "
                "default): the exact re-measure re-forwards a micro-batch through every layer, which across "
                "pipeline stages would mean running the pipeline again; with false each stage clips its own "
                "layers from the max logits of the step's forwards (K2's rule as published)")
        unsupported = {
            "zero_stage": (self.zero_stage, 1, "DeepSpeed's pipeline engine does not partition gradients or weights"),
            "loss_chunk_tokens": (self.loss_chunk_tokens, 0, "the last stage computes the whole loss"),
        }
        for name, (value, needed, why) in unsupported.items():
            if value != needed:
                raise ConfigError(f"TrainConfig.pp_size = {self.pp_size} needs {name} = {needed!r}, got {value!r} "
                                  f"({why})")

    def _check_model(self) -> None:
        hints = typing.get_type_hints(ModelConfig)
        check_keys(self.model, {"preset", *hints}, "model")
        if "preset" in self.model and not isinstance(self.model["preset"], str):
            raise ConfigError(f"model.preset = {self.model['preset']!r} must be a preset name; valid: {', '.join(PRESETS)}")
        overrides = {k: check_value(v, hints[k], f"model.{k}") for k, v in self.model.items() if k != "preset"}
        if self.resolved_model is None:
            self.model = {"preset": self.model.get("preset", DEFAULT_PRESET), **overrides}
            return
        check_keys(self.resolved_model, hints, "resolved_model")
        missing = [name for name in hints if name not in self.resolved_model]
        if missing:
            raise ConfigError(
                f"resolved_model lacks {', '.join(missing)}: it is the complete ModelConfig of a run, every field; "
                "delete resolved_model to build the model from model.preset instead"
            )
        self.resolved_model = {k: check_value(self.resolved_model[k], hints[k], f"resolved_model.{k}") for k in hints}
        for name, value in overrides.items():
            if value != self.resolved_model[name]:
                raise ConfigError(
                    f"model.{name} = {value!r} contradicts resolved_model.{name} = {self.resolved_model[name]!r}; "
                    f"a config with resolved_model trains exactly that model: drop model.{name}, or delete "
                    "resolved_model to build the model from model.preset"
                )
        self.model = {**self.model, **overrides}

    def _check_optimizer_args(self) -> None:
        for key, value in self.optimizer_args.items():
            if not isinstance(key, str) or not key.isidentifier():
                raise ConfigError(f"optimizer_args key {key!r} is not a keyword-argument name")
            if key in ("lr", "weight_decay"):
                # optim.build gets lr and weight_decay from the top-level fields; twice would be a TypeError.
                raise ConfigError(f"optimizer_args.{key} = {value!r}: set {key} as a top-level field ({flag(key)})")
            if not _all_finite(value):
                valid = "a finite number" if isinstance(value, float) else "made of finite numbers"
                raise ConfigError(f"optimizer_args.{key} = {value!r} must be {valid}")

    def model_config(self, vocab_size: int | None) -> ModelConfig:
        """The ModelConfig this run trains. vocab_size (the tokenizer's) fills the model's unless the
        user set one explicitly (or resolved_model is set), which must then be large enough. A run
        with init_from and no resolved_model yet takes its model from the source (launch/train.py)."""
        if self.resolved_model is not None:
            cfg = ModelConfig(**self.resolved_model)
            if vocab_size is not None and cfg.vocab_size < vocab_size:
                raise ConfigError(
                    f"resolved_model.vocab_size = {cfg.vocab_size} is smaller than the tokenizer's vocabulary ({vocab_size})"
                )
        else:
            overrides = {k: v for k, v in self.model.items() if k != "preset"}
            if vocab_size is not None:
                if "vocab_size" not in overrides:
                    overrides["vocab_size"] = vocab_size
                elif overrides["vocab_size"] < vocab_size:
                    raise ConfigError(
                        f"model.vocab_size = {overrides['vocab_size']} is smaller than the tokenizer's vocabulary ({vocab_size})"
                    )
            cfg = preset(self.model["preset"], **overrides)
        if self.seq_len > cfg.max_seq_len:
            raise ConfigError(f"seq_len = {self.seq_len} exceeds model.max_seq_len = {cfg.max_seq_len}")
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# (fields, test, what is valid). Each test is written so that it fails for a NaN.
_RANGES = [
    (("steps", "micro_batch_size", "grad_accum", "seq_len", "eval_every", "eval_batches", "log_every", "dist_timeout_s"),
     lambda v: v > 0, "> 0"),
    (("lr", "weight_decay", "grad_clip", "warmup_steps", "checkpoint_every", "keep_checkpoints", "max_skipped_steps"),
     lambda v: v >= 0, ">= 0"),
    (("loss_chunk_tokens",), lambda v: v >= 0, ">= 0"),
    (("ep_size", "pp_size"), lambda v: v >= 1, ">= 1"),
    (("min_lr_ratio",), lambda v: 0 <= v <= 1, "in [0, 1]"),
]


def _all_finite(value) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, (list, tuple)):
        return all(_all_finite(v) for v in value)
    if isinstance(value, dict):
        return all(_all_finite(v) for v in value.values())
    return True


def _file_values(path: str) -> dict:
    """The config file's fields, its sections checked to be tables of known keys."""
    values = load_file(path)
    where = f"config file {path!r}"
    check_keys(values, {f.name for f in fields(TrainConfig)}, where)
    for name, cls in (("model", ModelConfig), ("data", DataConfig), ("resolved_model", ModelConfig)):
        if values.get(name, {}) is None and name != "resolved_model":
            values[name] = {}  # `model:` with nothing under it
        section = values.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(f"section {name} of {where} must be a table of fields, got {section!r}")
        known = {f.name for f in fields(cls)} | ({"preset"} if name == "model" else set())
        check_keys(section, known, f"section {name} of {where}")
    return values


TRAIN_HELP = ("python -m launch.train", "Train a Kimi-K2-style MoE. With no arguments: the `small` preset on the "
              "Python standard library's source, on CPU in a few minutes.")


def build_parser(help: tuple[str, str] = TRAIN_HELP, defaults: dict | None = None) -> argparse.ArgumentParser:
    """TrainConfig's flags. `defaults` (a nested dict of fields, posttrain.sft's) replace the dataclass
    defaults in what --help shows; parse_args applies them."""
    defaults = defaults or {}
    train_fields = {f.name: f for f in fields(TrainConfig)}
    model = {**cli_help.default_of(train_fields["model"]), **defaults.get("model", {})}
    data_defaults = {f.name: f.default for f in fields(DataConfig)} | defaults.get("data", {})
    path_field = next(f for f in fields(DataConfig) if f.name == "path")

    parser = ConfigArgumentParser(prog=help[0], description=help[1], formatter_class=cli_help.HelpFormatter)
    parser.add_argument("--config", metavar="FILE", help="YAML or TOML file of TrainConfig fields, flags override it "
                        "(a run's config.yaml works; examples in configs/)")
    parser.add_argument("--model", dest="model_preset", metavar="NAME", help=cli_help.flag_help(
        cli_help.field_doc(TrainConfig, train_fields["model"]), model["preset"]))
    parser.add_argument("--data", dest="data_path", metavar="PATH",
                        help=cli_help.flag_help(cli_help.field_doc(DataConfig, path_field), data_defaults["path"]))
    # The deepspeed launcher appends --local_rank=N; the rank is read from LOCAL_RANK, as under torchrun.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    # Sections take dotted flags (parse_overrides); resolved_model comes from files only.
    cli_help.add_field_flags(parser, TrainConfig, defaults, skip=("model", "data", "resolved_model"))
    parser.epilog = lambda: _epilog(model, data_defaults)
    return parser


def _epilog(model: dict, data_defaults: dict) -> str:
    """The flags argparse does not parse itself (--model.FIELD, --data.FIELD), resolved_model, the
    optimizers and the presets, with their docs and defaults; `model`: the preset and its overrides."""
    model_defaults = {**dataclasses.asdict(preset(model["preset"])), **model}
    train_fields = {f.name: f for f in fields(TrainConfig)}
    resolved_doc = cli_help.field_doc(TrainConfig, train_fields["resolved_model"])
    return "\n\n".join([
        f"Model fields, --model.FIELD VALUE (or =VALUE), over the preset's; defaults: preset {model['preset']}'s. "
        "A run with --init-from trains its source's model and takes none of them.",
        cli_help.section_rows("model", ModelConfig, model_defaults),
        f"Data fields, --data.FIELD VALUE (or =VALUE): {cli_help.field_doc(TrainConfig, train_fields['data'])}. "
        "--data PATH is --data.path.",
        cli_help.section_rows("data", DataConfig, data_defaults, skip=("path",)),
        "In a config file only:",
        cli_help.rows([("resolved_model", cli_help.described(resolved_doc, None))]),
        "Optimizers (--optimizer NAME; lr and weight_decay are flags, the rest go in --optimizer-args):",
        cli_help.optimizer_rows(),
        "Model presets (--model NAME):",
        cli_help.preset_rows(),
    ])


def parse_overrides(argv: list[str] | None = None, help: tuple[str, str] = TRAIN_HELP,
                    defaults: dict | None = None) -> dict:
    """What the command gives explicitly: the --config file's fields, then the flags over them.

    A nested dict of TrainConfig fields, e.g. {"lr": 1e-05, "model": {"num_layers": 4}, "data": {...}};
    a field neither the file nor a flag names is absent. Flags are parsed to their field's type;
    unknown keys, unreadable files and malformed flags raise ConfigError. Ranges and consistency
    are TrainConfig's to check. `defaults` are only what --help shows (parse_args applies them).
    """
    args, rest = build_parser(help, defaults).parse_known_args(argv)
    values = _file_values(args.config) if args.config else {}
    hints = typing.get_type_hints(TrainConfig)
    for name, text in vars(args).items():
        if name in hints:
            values[name] = parse_value(text, hints[name], flag(name))
    flags = {"model": {}, "data": {}}
    if args.model_preset is not None:
        flags["model"]["preset"] = args.model_preset
    if args.data_path is not None:
        flags["data"]["path"] = args.data_path
    _section_flags(rest, flags)
    file_preset = values.get("model", {}).get("preset")
    if values.get("resolved_model") is not None and flags["model"].get("preset", file_preset) != file_preset:
        raise ConfigError(
            f"--model {flags['model']['preset']}: {args.config} has resolved_model, the fixed model of a run of "
            f"preset {file_preset!r}; delete resolved_model from the file to build another preset"
        )
    for section, given in flags.items():
        if given:
            values[section] = {**values.get(section, {}), **given}
    return values


def parse_args(argv: list[str] | None = None, defaults: dict | None = None,
               help: tuple[str, str] = TRAIN_HELP) -> TrainConfig:
    """Defaults <- --config file <- flags. Unknown keys, wrong types and bad values raise ConfigError.

    With --resume and an --out-dir that holds a run of ours, the run's saved config.yaml takes the
    defaults' place: `--resume --out-dir RUN` alone continues RUN as it was configured, and what
    the command gives on top is what it changes (which the trainer then accepts or refuses,
    launch/checkpoint/resume.py). `defaults` (a nested dict of fields, e.g. posttrain.sft's) replaces the
    dataclass defaults of a new run."""
    given = parse_overrides(argv, help, defaults)
    saved = saved_run_config(given["out_dir"]) if given.get("resume") and given.get("out_dir") else None
    base = saved if saved is not None else defaults or {}
    merged = {**base, **given}
    for section in ("model", "data"):
        merged[section] = {**base.get(section, {}), **given.get(section, {})}
    if saved is not None and set(given.get("model", {})) - {"preset"}:
        # A model field given on a resume: build what the command asks for, so that the trainer's
        # comparison with the checkpoint refuses it in the same words as any other change.
        merged.pop("resolved_model", None)
    return from_dict(TrainConfig, merged)


def saved_run_config(out_dir: str) -> dict | None:
    """The config.yaml of the run in `out_dir`, or None if `out_dir` holds no run of ours (then the
    trainer decides: a new run there, or a refusal)."""
    from launch.checkpoint import run_dir  # run_dir reads config files through this module

    out = Path(out_dir).expanduser()
    if not run_dir.is_ours(out) or not (out / "config.yaml").is_file():
        return None
    return _file_values(str(out / "config.yaml"))


def _section_flags(rest: list[str], flags: dict[str, dict]) -> None:
    """`--model.FIELD VALUE` / `--data.FIELD=VALUE` from argparse's leftovers into flags[section]."""
    hints = {"model": typing.get_type_hints(ModelConfig), "data": typing.get_type_hints(DataConfig)}
    i = 0
    while i < len(rest):
        token = rest[i]
        key, eq, text = token.partition("=")
        section, dot, name = key[2:].partition(".") if key.startswith("--") else ("", "", "")
        if section not in hints or not dot:
            raise ConfigError(f"unrecognized argument {token!r}; see --help")
        if not eq:
            if i + 1 == len(rest):
                raise ConfigError(f"{key} needs a value: {key} VALUE or {key}=VALUE")
            i += 1
            text = rest[i]
        i += 1
        name = name.replace("-", "_")
        if name not in hints[section]:
            raise ConfigError(
                f"unknown flag {key}: {section} has no field {name!r}; valid: {', '.join(sorted(hints[section]))}"
            )
        flags[section][name] = parse_value(text, hints[section][name], key)


def timestamped_run_dir(label: str) -> str:
    """$KIMI_MOE_RUNS (default runs)/<label>-<time>: where a command writes when not told."""
    return os.path.join(os.environ.get("KIMI_MOE_RUNS", "runs"), f"{label}-{time.strftime('%Y%m%d-%H%M%S')}")


def default_out_dir(cfg: TrainConfig) -> str:
    return timestamped_run_dir("sft" if cfg.data.format == "chat" else cfg.model.get("preset", "run"))
