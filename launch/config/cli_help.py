"""--help text made from the config dataclasses themselves, so a flag's description and default cannot
drift from its field.

Every field of a config dataclass is declared with `moe.config.doc_field(default, doc)`; its one-line
doc, followed by "(default: X)", is the flag's help. `field_doc` refuses a field declared without one,
so `--help` (and its test, tests/test_cli_help.py) fails the day a field is added undocumented.
The `--model.FIELD` / `--data.FIELD` flags are parsed from argparse's leftovers (launch/config/training.py),
so argparse cannot list them; `rows` lays them out in its two columns for the epilog.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import shutil
import textwrap
import typing

import optim
from moe.config import PRESETS

# argparse's default: help text starts in this column when the flag fits before it.
HELP_COLUMN = 24


def field_doc(cls, f: dataclasses.Field) -> str:
    doc = f.metadata.get("doc")
    if not doc:
        raise TypeError(f"{cls.__name__}.{f.name} has no doc: declare it with moe.config.doc_field(default, doc), "
                        "whose doc is the flag's --help text")
    return doc


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def described(doc: str, default) -> str:
    return f"{doc} (default: {default})"


def flag_help(doc: str, default) -> str:
    """`described` for add_argument: argparse %-formats help strings, so a literal % is doubled."""
    return described(doc, default).replace("%", "%%")


def metavar(hint) -> str:
    """INT, FLOAT, STR, BOOL, DICT; an optional field's non-None type (`str | None` -> STR)."""
    args = typing.get_args(hint)
    kind = next(t for t in args if t is not type(None)) if type(None) in args else hint
    return kind.__name__.upper()


class HelpFormatter(argparse.HelpFormatter):
    """argparse's layout, but words are never split at a hyphen (`per-document` stays whole, so a doc
    reads in --help as in the source), and lines of the description or epilog that start with a
    space are kept as laid out (`rows`); the others are filled as paragraphs."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        return "\n".join(
            line if line.startswith(" ") else
            textwrap.fill(" ".join(line.split()), width, initial_indent=indent, subsequent_indent=indent,
                          break_on_hyphens=False)
            for line in text.splitlines()
        )


def rows(entries: list[tuple[str, str]]) -> str:
    """(invocation, help) pairs in argparse's two columns, at the width argparse uses."""
    width = shutil.get_terminal_size().columns - 2
    wrap = max(width - HELP_COLUMN, 11)
    out = []
    for invocation, text in entries:
        lines = textwrap.wrap(" ".join(text.split()), wrap, break_on_hyphens=False)
        head = f"  {invocation}"
        if len(head) <= HELP_COLUMN - 2:  # fits before the help column, as argparse decides
            out.append(head.ljust(HELP_COLUMN) + lines.pop(0))
        else:
            out.append(head)
        out.extend(" " * HELP_COLUMN + line for line in lines)
    return "\n".join(out)


def section_rows(prefix: str, cls, defaults: dict, skip: tuple[str, ...] = ()) -> str:
    """One row per field of dataclass `cls` as `--PREFIX.FIELD TYPE`, with `defaults[field]`."""
    hints = typing.get_type_hints(cls)
    return rows([(f"--{prefix}.{f.name} {metavar(hints[f.name])}", described(field_doc(cls, f), defaults[f.name]))
                 for f in dataclasses.fields(cls) if f.name not in skip])


def optimizer_rows() -> str:
    """Each registry optimizer with the keys optimizer_args may set and their defaults (from its `build`);
    lr and weight_decay are top-level fields."""
    entries = []
    for name, build in optim.OPTIMIZERS.items():
        params = list(inspect.signature(build).parameters.values())[1:]  # after `model`
        keys = [f"{p.name}={p.default}" for p in params if p.name not in ("lr", "weight_decay")]
        entries.append((name, "optimizer_args: " + ", ".join(keys)))
    entries.append(("a.dotted.Path", "a torch.optim.Optimizer class such as torch.optim.SGD, given model.parameters()"))
    return rows(entries)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_field_flags(parser: argparse.ArgumentParser, cls, defaults: dict, skip: tuple[str, ...] = ()) -> None:
    """A flag per field of dataclass `cls` (`--field-name TYPE`; help: its doc and `defaults` over the
    dataclass's), absent from the parsed namespace unless given. A bare boolean flag means true
    (`--resume`); `--resume false` still works."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        bool_flag = {"nargs": "?", "const": "true"} if hints[f.name] is bool else {}
        parser.add_argument(flag(f.name), dest=f.name, default=argparse.SUPPRESS, metavar=metavar(hints[f.name]),
                            help=flag_help(field_doc(cls, f), defaults.get(f.name, default_of(f))), **bool_flag)


def preset_rows() -> str:
    """Each moe.config preset with its function's docstring."""
    entries = []
    for name, make in PRESETS.items():
        if not inspect.getdoc(make):
            raise TypeError(f"preset {name!r} ({make.__qualname__}) has no docstring: it is the preset's --help line")
        entries.append((name, inspect.getdoc(make)))
    return rows(entries)
