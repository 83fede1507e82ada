"""Command-line flags of our config dataclasses: the parser class, reading a flag's value by its
field's type, and the whole parser of a flat config (RL's, TRM's: one flag per field, --config FILE).

launch.train's nested TrainConfig (sections with dotted flags) builds on these in training.py.
"""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

from launch.config import cli_help
from launch.config.cli_help import flag
from launch.config.files import load_file, read_yaml
from moe.config import ConfigError, check_keys, check_value


class ConfigArgumentParser(argparse.ArgumentParser):
    """argparse, with errors as ConfigError and an epilog that may be a function: made only when help is printed."""

    def format_help(self):
        if callable(self.epilog):
            self.epilog = self.epilog()
        return super().format_help()

    def error(self, message):  # argparse would print usage and exit 2; a bad flag is a config error like any other
        raise ConfigError(f"{message}; see --help")


def parse_value(text: str, hint, where: str):
    """Turn a flag's string into the annotated type: YAML rules, so `1e-3`, `true`, `null`, `[1, 2]` work."""
    if hint is str or hint == (str | None):  # taken verbatim, so a path or name is never reinterpreted
        return None if text in ("null", "~") else text
    value = read_yaml(text, f"{where} {text!r}")
    if value is None and text.strip() not in ("null", "Null", "NULL", "~"):
        raise ConfigError(f"{where}: could not read {text!r}; expected {_type_label(hint).lower()}")
    return check_value(value, hint, where)


def _type_label(hint) -> str:
    return getattr(hint, "__name__", str(hint)).upper()



def flat_parser(cls, help: tuple[str, str]) -> argparse.ArgumentParser:
    """The parser of a flat config dataclass: --config FILE and one flag per field (its doc and
    default as help); `help` is (prog, description)."""
    parser = ConfigArgumentParser(prog=help[0], description=help[1], formatter_class=cli_help.HelpFormatter)
    parser.add_argument("--config", help=f"YAML or TOML file of {cls.__name__} fields (a run's config.yaml works)")
    # The deepspeed launcher appends --local_rank=N; the rank is read from LOCAL_RANK, as under torchrun.
    parser.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, help=argparse.SUPPRESS)
    cli_help.add_field_flags(parser, cls, {})
    return parser


def parse_flat(cls, parser: argparse.ArgumentParser, argv: list[str] | None = None, defaults: dict | None = None):
    """cls(**values) for a flat config dataclass (RL's, TRM's): `defaults` <- --config FILE <- flags,
    each flag read by its field's type; with --resume and --out-dir, the run's saved config.yaml
    replaces `defaults` as the base, so a resume continues the run it names. The parser takes one
    flag per field (cli_help.add_field_flags) and --config."""
    args = parser.parse_args(argv)
    hints = typing.get_type_hints(cls)
    given = load_file(args.config) if args.config else {}
    check_keys(given, hints, f"config file {args.config!r}")
    for name, text in vars(args).items():
        if name in hints:
            given[name] = parse_value(text, hints[name], flag(name))
    base = dict(defaults or {})
    if given.get("resume") and given.get("out_dir"):
        saved = Path(given["out_dir"]).expanduser() / "config.yaml"
        if saved.is_file():
            base = load_file(str(saved))
    values = {**base, **given}
    check_keys(values, hints, cls.__name__)
    return cls(**values)
