"""Config files: YAML (by YAML 1.2's float rules, duplicate keys refused) or TOML, read to a table.

PyYAML implements YAML 1.1, which reads `1e-3` (no dot) as a string; every user, and YAML 1.2, read
it as a number, so our loader resolves floats by 1.2's rules. A key written twice in one table is an
error, not last-wins. Used by every command's config (launch.train's, RL's, TRM's) and its flags.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from moe.config import ConfigError


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with floats by YAML 1.2 rules and duplicate keys refused.

    YAML 1.1, which PyYAML implements, reads `1e-3` (no dot) as a string; YAML 1.2 and every user
    read it as a number. `.inf` and `.nan` stay floats, so the finiteness check names them.
    """

    def construct_mapping(self, node, deep=False):
        first_seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` keys may be overridden; that is what merging is for
            key = self.construct_object(key_node, deep=True)
            try:
                first = first_seen.setdefault(key, key_node.start_mark)
            except TypeError:
                continue  # an unhashable key: SafeConstructor reports it
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {first.line + 1}); each key may appear once",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep)


_FLOAT_TAG = "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    char: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
    for char, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    _FLOAT_TAG,
    re.compile(
        r"""^(?:[-+]?[0-9][0-9_]*\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str, where: str):
    """The value YAML `text` holds; ConfigError naming `where` and the line for anything unreadable."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
        if mark is None or problem is None:
            raise ConfigError(f"{where} is not valid YAML: {err}") from None
        raise ConfigError(f"{where} is not valid YAML at line {mark.line + 1}, column {mark.column + 1}: {problem}") from None
    except (ValueError, RecursionError) as err:  # an int of more than 4300 digits; nesting deeper than Python's stack
        raise ConfigError(f"{where} could not be read: {err}") from None


def load_file(path: str) -> dict:
    """The table a YAML or TOML config file holds (an empty file: {}); ConfigError for anything else."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {path!r} is a directory; give a .yaml, .yml or .toml file")
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    if p.suffix not in (".yaml", ".yml", ".toml"):
        raise ConfigError(f"config file {path!r}: unsupported extension {p.suffix!r}; use .yaml, .yml or .toml")
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path!r} is not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    except OSError as err:
        raise ConfigError(f"config file {path!r} could not be read: {err.strerror}") from None
    if p.suffix == ".toml":
        try:
            values = tomllib.loads(text)
        except (ValueError, RecursionError) as err:  # TOMLDecodeError is a ValueError
            raise ConfigError(f"config file {path!r} is not valid TOML: {err}") from None
    else:
        values = read_yaml(text, f"config file {path!r}")
    if values is None:  # empty, or only comments
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path!r} must hold a table of fields, got {type(values).__name__}")
    return values
