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
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml

from .base import ConfigError


def load_config(cls: type, path: str | Path | None = None, overrides: Iterable[str] = ()) -> Any:
    """Build ``cls`` from its defaults, then a YAML file, then ``key=value`` overrides (in that order).

    A section (a nested dataclass) may be given as one string: a path ending in ``.yaml`` / ``.yml`` loads the
    section from that file (replacing what came before it); any other string sets the section's ``SHORTHAND``
    field (``teacher=runs/my_teacher`` is ``teacher.model=runs/my_teacher``). Keys a config lists in its
    ``REQUIRED`` must be set by one of the three.
    """
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        loaded = _read_yaml(Path(path))
        try:
            values = _check_mapping(cls, loaded, prefix="", source=source)
        except ConfigError as err:
            raise ConfigError(f"{err}{_section_hint(cls, loaded, path)}") from err
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        field_type = _field_type(cls, key)
        if _section(field_type):
            _set_section(values, key, field_type, raw.strip())
        else:
            _set_dotted(values, key, _parse_string(raw, field_type, key))
    config = _build(cls, values, prefix="", source=source)
    for key in getattr(cls, "REQUIRED", ()):
        if getattr(config, key) in (None, ""):
            raise ConfigError(
                f"missing required config key {key!r}: set it with --{key.replace('_', '-')}, {key}=... "
                "or in the --config YAML"
            )
    return config


def parse_job_args(
    cls: type,
    argv: Sequence[str] | None = None,
    description: str | None = None,
    aliases: Mapping[str, str] = {},
) -> Any:
    """A job's command line: ``--config YAML``, one ``--kebab-case`` flag per top-level field of ``cls``, then
    trailing ``key=value`` overrides; returns the config built by `load_config` (flags apply before overrides).

    Flags take the values overrides take (``--max-queries 20`` is ``max_queries=20``); a boolean field is a flag
    alone (``--lora``), a section takes its one-string form (``--teacher configs/teacher/x.yaml``).
    ``aliases`` maps extra flags to field names (``{"--model": "teacher"}``). The help's epilog lists every key.
    """
    import argparse

    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys:\n" + config_help(cls),
    )
    parser.add_argument("--config", default=None, help=f"YAML of the job's config ({cls.__name__})")
    fields = _fields(cls)
    for name, (f, field_type) in fields.items():
        flags = [f"--{name.replace('_', '-')}", *(a for a, target in aliases.items() if target == name)]
        help_text = f.metadata.get("help", "").replace("%", "%%")
        if field_type is bool:
            parser.add_argument(*flags, dest=name, action="store_const", const="true", help=help_text)
        elif _section(field_type):
            shorthand = getattr(_section(field_type), "SHORTHAND", None)
            one_string = f"a YAML of its keys or its {shorthand}" if shorthand else "a YAML of its keys"
            parser.add_argument(*flags, dest=name, metavar="VALUE", help=f"{help_text} ({one_string})")
        else:
            parser.add_argument(*flags, dest=name, metavar=name.upper(), help=help_text)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value (dotted keys for sections)")
    args = parser.parse_args(argv)
    flags = [f"{name}={getattr(args, name)}" for name in fields if getattr(args, name) is not None]
    return load_config(cls, args.config, flags + list(args.overrides))


def _read_yaml(path: Path) -> dict[str, Any]:
    """A YAML file's top-level mapping (``{}`` for an empty file)."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"config file not found: {path}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    if loaded is not None and not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
    return loaded or {}


def _section_hint(cls: type, loaded: Mapping[str, Any], path: str | Path) -> str:
    """For a YAML that does not fit ``cls`` but fits one of its sections whole: say to pass it as that section."""
    for name, (_f, field_type) in _fields(cls).items():
        section = _section(field_type)
        if section and loaded and set(loaded) <= set(_fields(section)):
            return (
                f" ({path} looks like a {name} config ({section.__name__}): pass it as "
                f"--{name.replace('_', '-')} {path})"
            )
    return ""


def _section_from_string(cls: type, text: str, key: str, source: str) -> dict[str, Any] | None:
    """A section given as one string, as checked values: a YAML file's keys, or ``{SHORTHAND: text}``; None when
    ``cls`` takes neither."""
    if text.endswith((".yaml", ".yml")):
        return _check_mapping(cls, _read_yaml(Path(text)), prefix="", source=text)
    shorthand = getattr(cls, "SHORTHAND", None)
    if shorthand is None:
        return None
    return {shorthand: _check_value(text, _fields(cls)[shorthand][1], f"{key}.{shorthand}", source)}


def _section(tp: Any) -> type | None:
    """The dataclass of a section field (``X`` or ``X | None``), else None."""
    inner = _is_optional(tp)[1]
    return inner if dataclasses.is_dataclass(inner) else None


def _set_section(values: dict[str, Any], key: str, field_type: Any, text: str) -> None:
    """``key=text`` for a section: a YAML file replaces the section, a shorthand sets that one field; ``none``
    drops an optional section."""
    if _is_optional(field_type)[0] and text.lower() in ("none", "null", "~"):
        _set_dotted(values, key, None)
        return
    section = _section_from_string(_section(field_type), text, key, "command line")
    if section is None:
        raise ConfigError(f"command line: {key!r} is a section; set one of its keys, e.g. {key}.<key>=...")
    if text.endswith((".yaml", ".yml")):
        _set_dotted(values, key, section)
    else:
        for name, value in section.items():
            _set_dotted(values, f"{key}.{name}", value)


def from_dict(cls: type, mapping: Mapping[str, Any], source: str = "dict") -> Any:
    """Build ``cls`` from a plain dict (as `to_dict` writes it), checking keys and types like a YAML file."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{source}: expected a mapping, got {type(mapping).__name__}")
    return _build(cls, _check_mapping(cls, mapping, prefix="", source=source), prefix="", source=source)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config dataclass."""
    return dataclasses.asdict(config)


def config_help(cls: type, prefix: str = "") -> str:
    """One line per key: ``key (type, default): help``; nested dataclasses are flattened with dots."""
    return "\n".join(
        f"  {key} ({type_name(field_type)}, default {default!r}): {f.metadata.get('help', '')}"
        for key, f, field_type, default in flat_fields(cls, prefix)
        if not dataclasses.is_dataclass(field_type)
    )


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def flat_fields(
    cls: type, prefix: str = "", base: Any = None
) -> Iterator[tuple[str, dataclasses.Field, Any, Any]]:
    """(dotted key, field, type, default) of every field in order; a nested dataclass comes just before its own
    keys, whose defaults are those of the section's own default (``base``). Keys a config sets itself in a section
    (its ``DERIVED`` class attribute: section name -> keys) are left out."""
    derived = getattr(cls, "DERIVED", {})
    for name, (f, field_type) in _fields(cls).items():
        default = getattr(base, name) if base is not None else _default(f)
        yield f"{prefix}{name}", f, field_type, default
        if dataclasses.is_dataclass(field_type):
            for key, *rest in flat_fields(field_type, f"{prefix}{name}.", default):
                if key.removeprefix(f"{prefix}{name}.").split(".")[0] not in derived.get(name, ()):
                    yield (key, *rest)


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
        if depth < len(parts) - 1:
            current = _section(current) or current
    return current


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        if values.get(part) is None:  # absent, or an optional section set to None before
            values[part] = {}
        values = values[part]
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
        section_type = _section(field_type)
        if section_type:
            if value is None and _is_optional(field_type)[0]:
                out[key] = None
                continue
            if isinstance(value, str):
                section = _section_from_string(section_type, value, dotted, source)
                if section is not None:
                    out[key] = section
                    continue
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted!r} must be a mapping of its keys, got {value!r}")
            out[key] = _check_mapping(section_type, value, f"{dotted}.", source)
        else:
            out[key] = _check_value(value, field_type, dotted, source)
    return out


def _build(cls: type, values: Mapping[str, Any], prefix: str, source: str, base: Any = None) -> Any:
    """``cls`` from ``values``; keys they leave out keep ``base``'s values (a field's own default instance, for a
    section such as a recipe whose defaults differ from its class's), else the class defaults."""
    kwargs = {}
    for name, (f, field_type) in _fields(cls).items():
        section = _section(field_type)
        nested_base = getattr(base, name) if base is not None else _default_instance(f)
        if section and values.get(name) is not None:
            kwargs[name] = _build(section, values[name], f"{prefix}{name}.", source, nested_base)
        elif section and name not in values and not _is_optional(field_type)[0]:
            kwargs[name] = _build(section, {}, f"{prefix}{name}.", source, nested_base)  # defaults, as nested
        elif name in values:
            kwargs[name] = values[name]
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {prefix}{err}") from err


def _default_instance(f: dataclasses.Field) -> Any:
    """The default of a section field (a dataclass instance), or None."""
    if f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
        return value if dataclasses.is_dataclass(value) else None
    return f.default if dataclasses.is_dataclass(f.default) else None


def type_name(tp: Any) -> str:
    optional, inner = _is_optional(tp)
    if optional:
        return f"{type_name(inner)} | None"
    if typing.get_origin(tp) is Literal:
        return "|".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{type_name(typing.get_args(tp)[0])}]"
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
        raise ConfigError(f"{source}: {key!r} must not be null (expected {type_name(tp)})")
    origin = typing.get_origin(inner)
    if origin is Literal:
        if value not in typing.get_args(inner):
            raise ConfigError(f"{source}: {key!r} must be one of {type_name(inner)}, got {value!r}")
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
        raise ConfigError(f"command line: {key}={raw!r} is not a valid {type_name(inner)}") from err
    return _check_value(raw if inner is str else text, inner, key, "command line")
