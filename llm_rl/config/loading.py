"""Reading a config: YAML files, `--key value` command-line overrides, and the conversion of each
value to its field's declared type (`coerce`, whose messages name the key); writing one back as
YAML; the `--help` listing of a config dataclass. Shared by the PPO and the reward-model config.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from llm_rl.config.errors import ConfigError


def coerce(value: Any, field_type: Any, key: str, source: str) -> Any:
    """Convert a YAML/CLI value to the field's declared type, or raise ConfigError."""
    optional = False
    if typing.get_origin(field_type) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(field_type) if a is not type(None)]
        optional, field_type = True, args[0]
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: '{key}' cannot be null")
    if isinstance(value, str) and value.lower() in ("none", "null") and optional:
        return None
    if typing.get_origin(field_type) is Literal:
        choices = typing.get_args(field_type)
        if value not in choices:
            raise ConfigError(
                f"{source}: '{key}' is one of {', '.join(map(str, choices))}{' or null' if optional else ''}; "
                f"got {value!r}"
            )
        return value
    try:
        if field_type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise ValueError
        if field_type is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if field_type is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if math.isnan(out):
                raise ValueError
            return out
        if field_type is str:
            return str(value)
        if typing.get_origin(field_type) is list or field_type is list:
            if isinstance(value, str):
                value = [yaml.safe_load(v.strip()) for v in value.split(",") if v.strip()]
            (item_type,) = typing.get_args(field_type) or (None,)
            if item_type in (int, float) and isinstance(value, (int, float)):
                value = [value]  # one number is a list of one (`reward_weights: 1`)
            if not isinstance(value, (list, tuple)):
                raise ValueError
            return [coerce(v, item_type, key, source) for v in value] if item_type else list(value)
    except ConfigError:  # an item's own message (e.g. the allowed values) says more than "expects list"
        raise
    except (TypeError, ValueError):
        pass
    else:
        return value
    name = getattr(field_type, "__name__", str(field_type))
    raise ConfigError(f"{source}: '{key}' expects {name}{' or null' if optional else ''}, got {value!r}")


def fill_from_yaml(config, path: Optional[str | Path], overrides: Optional[list[str]], field_types: dict[str, Any]):
    """Update `config` (any config with set_values/validate) from a YAML file, then `--key value` overrides
    (`field_types`: every key's type); validate. Every bad key of the file and the command line is
    reported in one ConfigError (`KeyProblems`), so one run lists all there is to fix."""
    problems = []
    sources = []
    if path is not None:
        problems += collect_key_problems(config.set_values, load_yaml(path), str(path))
        sources.append(str(path))
    if overrides:
        bools = frozenset(k for k, t in field_types.items() if t is bool)
        problems += collect_key_problems(config.set_values, parse_overrides(overrides, bools), "command line")
        sources.append("the command line")
    if problems:
        raise KeyProblems(problems, " and ".join(sources))
    config.validate()
    return config


class KeyProblems(ConfigError):
    """Several keys of a config to fix at once (unknown, misplaced or of the wrong type): one line each."""

    def __init__(self, problems: list[ConfigError], where: str):
        self.problems = problems
        if len(problems) == 1:
            super().__init__(str(problems[0]))
            return
        kind = "unknown keys" if all(isinstance(p, UnknownKey) for p in problems) else "keys to fix"
        super().__init__("\n".join([f"{len(problems)} {kind} in {where}:", *(f"  {p}" for p in problems)]))


class UnknownKey(ConfigError):
    """A key the config does not have (or not in the section it stands in); the message gives the key meant."""


def set_each(values: dict, source: str, set_one) -> None:
    """`set_one(key, value)` for every item; the ConfigErrors of all keys raised together as KeyProblems."""
    problems = []
    for key, value in (values or {}).items():
        try:
            set_one(key, value)
        except KeyProblems as e:
            problems += e.problems
        except ConfigError as e:
            problems.append(e)
    if problems:
        raise KeyProblems(problems, source)


def collect_key_problems(set_values, values: dict, source: str) -> list[ConfigError]:
    """The ConfigErrors of `set_values(values, source)` (empty when every key was set)."""
    try:
        set_values(values, source)
    except KeyProblems as e:
        return e.problems
    return []


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values at the top level")
    return data


def split_config_arg(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """(path of `--config FILE` or `--config=FILE`, wherever it stands; the other arguments)."""
    rest, path, i = [], None, 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            path, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            path, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    return path, rest


def parse_overrides(args: list[str], bool_keys: frozenset[str] = frozenset()) -> dict:
    """Command-line overrides as TrlParser users type them, values parsed as YAML scalars:

    `--lr 1e-5` and `--lr=1e-5`; `--flag` (true) and `--no_flag` (false, for a boolean in
    `bool_keys`); `--reward_funcs a b` (several values make a list).
    """
    values, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key, i = arg[2:], i + 1
        if "=" in key:
            key, raw = key.split("=", 1)
            raws = [raw]
        else:
            raws = []
            while i < len(args) and not args[i].startswith("--"):
                raws.append(args[i])
                i += 1
        key = key.replace("-", "_")
        if not raws and key.startswith("no_") and key[3:] in bool_keys:
            key, raws = key[3:], ["false"]
        parsed = [yaml_scalar(raw) for raw in raws or ["true"]]  # a bare flag switches a boolean on
        values[key] = parsed[0] if len(parsed) == 1 else parsed
    return values


def yaml_scalar(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def write_yaml(values: dict, path: str | Path) -> None:
    """A config's values as YAML, in field order (the file saved beside a trained model)."""
    Path(path).write_text(yaml.safe_dump(values, sort_keys=False))


def option_lines(cls) -> list[str]:
    """`--key  help [default: value]` for each field of a config dataclass: the `--help` listing."""
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        lines.append(f"  --{f.name:<28} {f.metadata.get('help', '')} [default: {default}]")
    return lines
