"""The building blocks of the config dataclasses: `ConfigError`, `option` and the range checks they share."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names it."""


def option(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with a default and a help string (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: dataclasses.replace(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def check_gpu_shares(config: Any, *names: str) -> None:
    """Raise `ConfigError` naming the first field of ``names`` outside (0, 8]: a GPU share or count per actor."""
    for name in names:
        if not 0 < getattr(config, name) <= 8:
            raise ConfigError(f"{name} must be in (0, 8], got {getattr(config, name)}")


def check_at_least(config: Any, minimum: float, *names: str) -> None:
    """Raise `ConfigError` naming the first field of ``names`` below ``minimum``."""
    for name in names:
        if getattr(config, name) < minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {getattr(config, name)}")


def actor_range(text: str) -> tuple[int, int]:
    """``MIN:MAX`` or ``N`` -> (min, max) of an actor pool (the jobs' ``actors`` key)."""
    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError as err:
        raise ConfigError(f"actors expects MIN:MAX or N, got {text!r}") from err
