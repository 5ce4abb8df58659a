"""The one config parser: JSON sections into typed dataclasses, `section.field=value` overrides, range checks.

    {"train": {"steps": 600, "lr": 1e-3}, "data": {"families": ["classify"]}}     a config file
    --set train.steps=800 --set data.families=classify                            overrides (all apply, in order)

Values are checked against the dataclass field types before anything runs: an int field refuses `2.5`
and `true`, a float field refuses `"abc"`, a bool field refuses `1`, a tuple field given one value gets a
one-element tuple (`"classify"` -> `("classify",)`, never a tuple of letters). Unknown sections and fields
are errors that list the known ones; a JSON syntax error names the file, line and column. Range checks
live beside each dataclass (`check_fields`), so every error names the field and where it is documented.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from pathlib import Path
from typing import Any

__all__ = ["ConfigError", "check_fields", "build", "parse_value", "apply_overrides", "read_json", "to_json"]


class ConfigError(ValueError):
    """A config value, field, section or file that cannot be used; the message says which and how to fix it."""


def check_fields(config: object, checks: dict[str, bool]) -> None:
    """Raise ConfigError for the first field whose check is False, e.g.
    `TrainConfig.lr = -1.0 is out of range (see the comment on `lr` in gistlib/train/loop.py)`."""
    cls = type(config)
    source = inspect.getsourcefile(cls) or cls.__module__
    where = "gistlib/" + source.split("gistlib/")[-1] if "gistlib/" in source else source
    for name, ok in checks.items():
        if not ok:
            raise ConfigError(
                f"{cls.__name__}.{name} = {getattr(config, name)!r} is out of range "
                f"(see the comment on `{name}` in {where})"
            )


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, where: str) -> Any:
    """`value` checked against the annotation `tp` (int, float, bool, str, X | None, tuple[X, ...])."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where} = {value!r}: expected {tp}")
    if origin is tuple:
        (item, *rest) = typing.get_args(tp)
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(items))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    else:
        raise ConfigError(f"{where}: the parser does not know the field type {tp}")
    raise ConfigError(f"{where} = {value!r}: expected {_type_name(tp)}, got {type(value).__name__}")


def build(cls: type, values: dict | None, section: str | None = None):
    """An instance of the dataclass `cls` from `values`, every value type-checked; errors name `section.field`."""
    values = dict(values or {})
    label = section or cls.__name__
    if not isinstance(values, dict):
        raise ConfigError(f"{label}: expected an object of fields, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown field(s) {', '.join(f'{label}.{u}' for u in unknown)}; known: {', '.join(known)}")
    typed = {name: _coerce(v, hints[name], f"{label}.{name}") for name, v in values.items()}
    return cls(**typed)


def parse_value(text: str) -> Any:
    """A `--set` value: JSON where it parses (numbers, booleans, lists, null), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(raw: dict, assignments: list[str] | None, sections: dict[str, type]) -> dict:
    """`raw` with every `section.field=value` applied in order (repeated names: the last one wins)."""
    out = {k: dict(v) for k, v in raw.items()}
    for assignment in assignments or []:
        key, sep, text = assignment.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"--set expects section.field=value, got {assignment!r}")
        if section not in sections:
            raise ConfigError(f"--set {key}: unknown section {section!r}; known: {', '.join(sections)}")
        known = [f.name for f in dataclasses.fields(sections[section]) if f.init]
        if name not in known:
            raise ConfigError(f"--set {key}: unknown field {name!r} of {section}; known: {', '.join(known)}")
        out.setdefault(section, {})[name] = parse_value(text)
    return out


def read_json(path: str | Path) -> dict:
    """A JSON object from a file; a syntax error names the file, line and column."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}:{err.colno}: invalid JSON ({err.msg})") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a JSON object of sections, got {type(raw).__name__}")
    return raw


def to_json(config) -> Any:
    """Dataclasses as plain JSON values (tuples as lists), for `--dump` and summaries."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_json(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_json(v) for v in config]
    if isinstance(config, dict):
        return {k: to_json(v) for k, v in config.items()}
    return config
