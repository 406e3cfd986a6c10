"""Loading configs: defaults, then a YAML file, then ``key=value`` overrides, checked against the dataclass.

Every job builds its config the same way::

    cfg = load_config(TeacherConfig, "configs/teacher/esconv_strategy.yaml", ["prompt.max_doc_tokens=256"])

Nested dataclasses are addressed with dotted keys. Values from the command line are converted to the field's
type; values from YAML are checked against it. An unknown key or a value of the wrong type raises `ConfigError`
naming the key (and the file), so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from .base import ConfigError
from .schema import PromptConfig


def load_config(cls: type, path: str | Path | None = None, overrides: Iterable[str] = ()) -> Any:
    """Build ``cls`` from its defaults, then a YAML file, then ``key=value`` overrides (in that order)."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        values = _check_mapping(cls, loaded or {}, prefix="", source=source)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        field_type = _field_type(cls, key.strip())
        _set_dotted(values, key.strip(), _parse_string(raw, field_type, key.strip()))
    return _build(cls, values, prefix="", source=source)


def from_dict(cls: type, mapping: Mapping[str, Any], source: str = "dict") -> Any:
    """Build ``cls`` from a plain dict (as `to_dict` writes it), checking keys and types like a YAML file."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{source}: expected a mapping, got {type(mapping).__name__}")
    return _build(cls, _check_mapping(cls, mapping, prefix="", source=source), prefix="", source=source)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config dataclass."""
    return dataclasses.asdict(config)


def prompt_differences(recorded: Mapping[str, Any], prompt: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, recorded value, value in prompt)`` for each field of ``prompt`` (a `PromptConfig` as a dict, or
    part of one) that differs from ``recorded``, sorted by key.

    A field the record lacks (written before the field existed) counts as its default, which is what that
    record's prompts were rendered with.
    """
    defaults = to_dict(PromptConfig())
    return [
        (key, recorded.get(key, defaults.get(key)), value)
        for key, value in sorted(prompt.items())
        if recorded.get(key, defaults.get(key)) != value
    ]


def config_help(cls: type, prefix: str = "") -> str:
    """One line per key: ``key (type, default): help``; nested dataclasses are flattened with dots."""
    return "\n".join(
        f"  {key} ({_type_name(field_type)}, default {_default(f)!r}): {f.metadata.get('help', '')}"
        for key, f, field_type in _flat_fields(cls, prefix)
        if not dataclasses.is_dataclass(field_type)
    )


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _flat_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every field in order; a nested dataclass comes just before its own keys."""
    for name, (f, field_type) in _fields(cls).items():
        yield f"{prefix}{name}", f, field_type
        if dataclasses.is_dataclass(field_type):
            yield from _flat_fields(field_type, f"{prefix}{name}.")


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _unknown(key: str, known: Iterable[str], source: str) -> ConfigError:
    known = sorted(known)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _field_type(cls: type, dotted: str) -> Any:
    current: Any = cls
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        fields = _fields(current)
        if part not in fields:
            raise _unknown(dotted, [".".join(parts[:depth] + [k]) for k in fields], "command line")
        current = fields[part][1]
    if dataclasses.is_dataclass(current):
        raise ConfigError(
            f"command line: {dotted!r} is a section; set one of its keys, e.g. {dotted}.<key>=..."
        )
    return current


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        values = values.setdefault(part, {})
    values[last] = value


def _check_mapping(cls: type, mapping: Mapping[str, Any], prefix: str, source: str) -> dict[str, Any]:
    fields = _fields(cls)
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str):
            raise ConfigError(
                f"{source}: key {prefix}{key!r} is not a string (YAML reads yes/no/on/off/true/false as booleans; quote it)"
            )
        if key not in fields:
            raise _unknown(dotted, [f"{prefix}{k}" for k in fields], source)
        field_type = fields[key][1]
        if dataclasses.is_dataclass(field_type):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted!r} must be a mapping of its keys, got {value!r}")
            out[key] = _check_mapping(field_type, value, f"{dotted}.", source)
        else:
            out[key] = _check_value(value, field_type, dotted, source)
    return out


def _build(cls: type, values: Mapping[str, Any], prefix: str, source: str) -> Any:
    kwargs = {}
    for name, (_f, field_type) in _fields(cls).items():
        if dataclasses.is_dataclass(field_type):
            kwargs[name] = _build(field_type, values.get(name, {}), f"{prefix}{name}.", source)
        elif name in values:
            kwargs[name] = values[name]
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {prefix}{err}") from err


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _check_value(value: Any, tp: Any, key: str, source: str) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key!r} must not be null (expected {_type_name(tp)})")
    origin = typing.get_origin(inner)
    if origin is Literal:
        if value not in typing.get_args(inner):
            raise ConfigError(f"{source}: {key!r} must be one of {_type_name(inner)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key!r} must be a list, got {value!r}")
        (item_type,) = typing.get_args(inner)
        return [_check_value(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner in (int, float, str, bool) and (
        not isinstance(value, inner) or (inner is int and isinstance(value, bool))
    ):
        hint = " (quote it in YAML)" if inner is str and isinstance(value, bool) else ""
        raise ConfigError(
            f"{source}: {key!r} expects {inner.__name__}, got {type(value).__name__} {value!r}{hint}"
        )
    return value


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_string(raw: str, tp: Any, key: str) -> Any:
    optional, inner = _is_optional(tp)
    text = raw.strip()
    if optional and text.lower() in ("none", "null", "~"):
        return None
    try:
        if inner is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if inner is int:
            return int(text)
        if inner is float:
            return float(text)
        if typing.get_origin(inner) is list:
            parsed = yaml.safe_load(text) if text.startswith("[") else [t for t in text.split(",") if t]
            (item_type,) = typing.get_args(inner)
            if item_type is not str:
                parsed = [_parse_string(str(v), item_type, key) for v in parsed]
            return _check_value(parsed, inner, key, "command line")
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"command line: {key}={raw!r} is not a valid {_type_name(inner)}") from err
    return _check_value(raw if inner is str else text, inner, key, "command line")
