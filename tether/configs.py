"""Typed dataclass configs: flat CLI flags and files generated from (possibly nested) fields, validation.

A config is a dataclass whose fields are declared with ``opt(default, "one-line help", group=...)``. Choices
are ``Enum`` fields. A field declared with ``section(...)`` holds a nested config of one mode or feature
(``TrainConfig.async_``: the async loop's settings): on the command line and in files its fields stay flat
(``--max-staleness``, ``budget_max_kl = 0.02``), routed to the section by the section's flag prefix. An
optional section (``AsyncConfig | None``) exists only when its switch is on (``mode = async``); a flat field
of a section that is off is an error naming the field and the switch, never silently ignored.

``build(cls, values)`` is the one edge every entry point goes through (the CLI, ``--config FILE``, the
Python API's ``TrainConfig.from_flat(...)``): unknown names get a "did you mean" (TRL's names included),
every value is coerced to its declared type (strings to enums, ...) with an error that names the field and
the file. ``coerce_fields(self)`` in a config's ``__post_init__`` gives direct construction
(``TrainConfig(mode="async")``) the same conversion and checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import enum
import functools
import json
import math
import sys
import types
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
_UNSET = object()


def opt(default: Any, help: str, *, group: str | None = None, **kwargs: Any) -> Any:
    """A config field with a default, a one-line help string and (for ``--help``) the group it is listed under."""
    return dataclasses.field(default=default, metadata={"help": help, "group": group, **kwargs})


def section(cls: type, help: str, *, prefix: str = "", switch: Callable[[Mapping[str, Any]], bool] | None = None,
            needs: str = "", group: str | None = None) -> Any:
    """A nested config field. Its fields are flat flags named ``prefix + field``. ``switch(top_level_values)``
    (an optional section): the section exists iff it returns True; ``needs`` says what turns it on (for errors)."""
    default = {"default": None} if switch is not None else {"default_factory": cls}
    return dataclasses.field(**default, metadata={"help": help, "section": cls, "prefix": prefix, "switch": switch,
                                                  "needs": needs, "group": group or cls.__name__})


@dataclasses.dataclass(frozen=True)
class FlatField:
    """One flat flag / file key of a config and where it lives."""
    name: str
    """The flat name (``max_staleness``, ``budget_max_kl``)."""
    owner: type
    """The dataclass that declares it (the config or one of its sections)."""
    field: dataclasses.Field
    section: str | None
    """The attribute of the section holding it; None for a top-level field."""
    group: str


def flat_fields(cls: type) -> list[FlatField]:
    """Every flat field of ``cls``, sections expanded in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        sec = f.metadata.get("section")
        if sec is None:
            out.append(FlatField(f.name, cls, f, None, f.metadata.get("group") or "general"))
            continue
        for g in dataclasses.fields(sec):
            out.append(FlatField(f.metadata["prefix"] + g.name, sec, g, f.name, f.metadata["group"]))
    return out


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """The resolved annotations of a config class (resolving them is slow: ~2.5 ms a call, 167 calls per
    TrainConfig build; a class's annotations never change after it is defined)."""
    return typing.get_type_hints(cls)


def coerce(cls: type, name: str, value: Any, where: str = "", label: str | None = None) -> Any:
    """Convert ``value`` to the declared type of ``cls.name`` or raise naming the field (as ``label``)."""
    tp, optional = _unwrap_optional(_field_types(cls)[name])
    name = label or name
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
        if tp is list or typing.get_origin(tp) is list:  # list[str]: one string is a list of one
            if isinstance(value, str):
                return [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
                raise TypeError
            return list(value)
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




def coerce_fields(obj: Any, where: str = "") -> None:
    """Coerce every (non-section) field of a config instance in place, as ``build`` does: strings to enums,
    ints to floats, ...; a float field must be finite. Call first in ``__post_init__``."""
    cls = type(obj)
    prefix = getattr(cls, "FLAT_PREFIX", "")  # a section's fields are named by their flat names in errors
    for f in dataclasses.fields(cls):
        if f.metadata.get("section") is not None:
            continue
        value = coerce(cls, f.name, getattr(obj, f.name), where, label=prefix + f.name)
        tp, _ = _unwrap_optional(_field_types(cls)[f.name])
        if tp is float and value is not None and not math.isfinite(value):
            raise ValueError(f"config field '{prefix + f.name}' must be finite, got {value}")
        object.__setattr__(obj, f.name, value)


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


def _did_you_mean(name: str, names: list[str], aliases: Mapping[str, str]) -> str:
    if name in aliases:
        return f" (did you mean '{aliases[name]}'? tether's name for it)"
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
    return f" (did you mean '{close[0]}'?)" if close else ""


def build(cls: type[T], values: Mapping[str, Any], where: str = "") -> T:
    """Construct ``cls`` from flat values (CLI, files, ``from_flat``): unknown keys rejected with a "did you
    mean", every value coerced naming the field, section fields routed to their section."""
    loc = f" in {where}" if where else ""
    fields = {ff.name: ff for ff in flat_fields(cls)}
    aliases = getattr(cls, "ALIASES", {})
    unknown = sorted(set(values) - set(fields))
    if unknown:
        hints = "; ".join(f"'{u}'{_did_you_mean(u, list(fields), aliases)}" for u in unknown)
        raise ValueError(f"unknown config field(s) {hints}{loc}. `tether {getattr(cls, 'COMMAND', 'train')} --help` "
                         "lists every field")
    top: dict[str, Any] = {}
    per_section: dict[str, dict[str, Any]] = {}
    for name, v in values.items():
        ff = fields[name]
        value = coerce(ff.owner, ff.field.name, v, where, label=name)
        if ff.section is None:
            top[name] = value
        else:
            per_section.setdefault(ff.section, {})[ff.field.name] = (name, value)
    resolved = {f.name: top.get(f.name, f.default) for f in dataclasses.fields(cls) if f.metadata.get("section") is None
                and f.default is not dataclasses.MISSING}
    for f in dataclasses.fields(cls):
        sec = f.metadata.get("section")
        if sec is None:
            continue
        given = per_section.get(f.name, {})
        switch = f.metadata["switch"]
        if switch is not None and not switch(resolved):
            if given:
                flat = next(iter(given.values()))[0]
                raise ValueError(f"config field '{flat}'{loc} needs {f.metadata['needs']} (it is a setting of "
                                 f"{f.metadata['help']}; without it the field would be ignored)")
            top[f.name] = None
            continue
        try:
            top[f.name] = sec(**{k: v for k, (_, v) in given.items()})
        except ValueError as e:
            raise ValueError(f"{e}{loc}") from None
    return cls(**top)


def _help(text: str) -> str:
    return text.replace("%", "%%")  # argparse formats help strings with %


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One ``--field-name`` flag per flat field, listed by group; enum flags show their choices; defaults are
    left unset so file values are not overridden."""
    parser.add_argument("--config", default=None, help="TOML or YAML file of config fields (flags override it)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for ff in flat_fields(cls):
        if ff.group not in groups:
            groups[ff.group] = parser.add_argument_group(ff.group)
        g = groups[ff.group]
        f = ff.field
        flag = "--" + ff.name.replace("_", "-")
        tp, _ = _unwrap_optional(_field_types(ff.owner)[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        shown = default.value if isinstance(default, enum.Enum) else default
        help_text = _help(f"{f.metadata.get('help', '')} (default: {shown})")
        if tp is bool:
            g.add_argument(flag, dest=ff.name, action=argparse.BooleanOptionalAction, default=_UNSET, help=help_text)
        elif isinstance(tp, type) and issubclass(tp, enum.Enum):
            g.add_argument(flag, dest=ff.name, default=_UNSET, choices=[m.value for m in tp], help=help_text)
        elif tp is list or typing.get_origin(tp) is list:  # repeatable: --reward a --reward b
            g.add_argument(flag, dest=ff.name, default=_UNSET, action=_Append, help=help_text + " (repeatable)",
                           metavar=ff.name.upper())
        else:
            g.add_argument(flag, dest=ff.name, default=_UNSET, help=help_text, metavar=ff.name.upper())


class _Append(argparse.Action):
    """``action="append"`` whose default stays ``_UNSET`` (so a file's list is replaced, not extended)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, _UNSET)
        setattr(namespace, self.dest, (list(current) if isinstance(current, list) else []) + [values])


def given(args: argparse.Namespace, name: str) -> Any:
    """The value of flag ``name`` if it was given on the command line, else None."""
    v = getattr(args, name, _UNSET)
    return None if v is _UNSET else v


def config_from_args(cls: type[T], args: argparse.Namespace,
                     job: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None) -> T:
    """``cls`` from a config file (``--config``) and the flags given, flags winning. ``job(values)`` (a command's
    default job): more values placed under the given ones (``tether train``'s ``default_job``)."""
    values: dict[str, Any] = {}
    where = ""
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
        where = str(args.config)
    for ff in flat_fields(cls):
        v = getattr(args, ff.name, _UNSET)
        if v is not _UNSET:
            values[ff.name] = v
    if job is not None:
        values = {**job(values), **values}
    return build(cls, values, where)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as flat JSON-able values (what ``build`` reads back: config.json, trackers); an optional
    section that is off is left out."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.metadata.get("section") is not None:
            if v is not None:
                out.update({f.metadata["prefix"] + k: x for k, x in to_dict(v).items()})
            continue
        out[f.name] = v.value if isinstance(v, enum.Enum) else v
    return out
