"""Typed, flat dataclass configs: CLI flags generated from the fields, TOML/YAML files, validation.

A config is a dataclass whose fields are declared with ``opt(default, "one-line help")``. Choices are
``Enum`` fields. ``add_dataclass_arguments`` makes one ``--field-name`` flag per field;
``config_from_args`` merges defaults < ``--config FILE`` < explicit flags, and type-checks every value
with an error that names the field (and the file).
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_UNSET = object()


def opt(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with a default and a one-line help string."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(cls: type, name: str, value: Any, where: str = "") -> Any:
    """Convert ``value`` to the declared type of ``cls.name`` or raise naming the field."""
    tp, optional = _unwrap_optional(_field_types(cls)[name])
    loc = f" in {where}" if where else ""
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise ValueError(f"config field '{name}'{loc} may not be empty")
    try:
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            try:
                return tp(value)
            except ValueError:
                valid = ", ".join(str(m.value) for m in tp)
                raise ValueError(f"config field '{name}'{loc}: '{value}' is not one of: {valid}") from None
        if tp is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if tp is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise TypeError
            return str(value)
        if tp is dict or typing.get_origin(tp) is dict:
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError as e:
                    raise ValueError(f"config field '{name}'{loc}: invalid JSON {value!r}: {e}") from None
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
    except (TypeError, ValueError) as e:
        if isinstance(e, ValueError) and "config field" in str(e):
            raise
        raise ValueError(f"config field '{name}'{loc}: expected {getattr(tp, '__name__', tp)}, got {value!r}") from None
    return value


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    if path.suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"{path}: invalid TOML: {e}") from None
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: invalid YAML: {e}") from None
    elif path.suffix == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"{path}: config files must be .toml, .yaml, .yml or .json")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of config fields at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build(cls: type[T], values: dict[str, Any], where: str = "") -> T:
    """Construct ``cls`` from a mapping, rejecting unknown keys and coercing every value."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        loc = f" in {where}" if where else ""
        raise ValueError(f"unknown config field(s) {', '.join(unknown)}{loc}; valid fields: {', '.join(sorted(names))}")
    return cls(**{k: coerce(cls, k, v, where) for k, v in values.items()})


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` flag per field; defaults are left unset so file values are not overridden."""
    hints = _field_types(cls)
    parser.add_argument("--config", default=None, help="TOML or YAML file of config fields (flags override it)")
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _unwrap_optional(hints[f.name])
        help_text = f"{f.metadata.get('help', '')} (default: {f.default if not isinstance(f.default, enum.Enum) else f.default.value})"
        if tp is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=_UNSET, help=help_text)
        else:
            choices = [m.value for m in tp] if isinstance(tp, type) and issubclass(tp, enum.Enum) else None
            parser.add_argument(flag, dest=f.name, default=_UNSET, choices=choices, help=help_text, metavar=f.name.upper())


def given(args: argparse.Namespace, name: str) -> Any:
    """The value of flag ``name`` if it was given on the command line, else None."""
    v = getattr(args, name, _UNSET)
    return None if v is _UNSET else v


def config_from_args(cls: type[T], args: argparse.Namespace) -> T:
    values: dict[str, Any] = {}
    where = ""
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
        where = str(args.config)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, _UNSET)
        if v is not _UNSET:
            values[f.name] = v
    return build(cls, values, where)


def to_dict(cfg: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = v.value if isinstance(v, enum.Enum) else v
    return out
