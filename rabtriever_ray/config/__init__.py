"""Typed configuration: dataclasses with defaults and help, YAML files, and ``key=value`` overrides.

- `schema`: the training jobs' config dataclasses; `offline`: the jobs around them (scoring, indexing,
  evaluation); `sections`: the sections they nest (prompt, teacher, student, losses); `serving`: the Serve app's.
- `loading`: defaults, then YAML, then overrides (`load_config`), the jobs' command line (`parse_job_args`), and
  the helpers built on the schema walk (`from_dict`, `to_dict`, `config_help`); `prompt_differences` and
  `recorded_prompt` compare a recorded prompt with a `PromptConfig`.
- `reference`: docs/configuration.md's configuration reference, generated from the dataclasses (``python -m
  rabtriever_ray.config.reference --write``); off the runtime path, so it is imported only on demand.

Every name is importable from here: ``from rabtriever_ray.config import TeacherConfig, load_config``.
"""

from __future__ import annotations

from typing import Any

from .base import ConfigError, actor_range, option
from .loading import (
    config_help,
    from_dict,
    load_config,
    parse_job_args,
    to_dict,
)
from .offline import EvaluateConfig, IndexConfig, ScoreTeacherConfig
from .schema import DistillConfig, TeacherTrainConfig
from .sections import (
    LossConfig,
    PromptConfig,
    StudentConfig,
    TeacherConfig,
    prompt_differences,
    recorded_prompt,
)
from .serving import RouterResources, ServeConfig, ServeResources

__all__ = [
    "ConfigError",
    "DistillConfig",
    "EvaluateConfig",
    "IndexConfig",
    "LossConfig",
    "PromptConfig",
    "RouterResources",
    "ScoreTeacherConfig",
    "ServeConfig",
    "ServeResources",
    "StudentConfig",
    "TeacherConfig",
    "TeacherTrainConfig",
    "actor_range",
    "config_help",
    "from_dict",
    "load_config",
    "option",
    "parse_job_args",
    "prompt_differences",
    "recorded_prompt",
    "to_dict",
]

# The configuration reference generator, loaded only when one of its names is asked for.
_REFERENCE_NAMES = {
    "REFERENCE_CONFIGS",
    "REFERENCE_END",
    "REFERENCE_PAGE",
    "REFERENCE_START",
    "REGENERATE",
    "config_reference_markdown",
    "documented_config_reference",
    "main",
    "write_config_reference",
}


def __getattr__(name: str) -> Any:
    if name in _REFERENCE_NAMES:
        from . import reference

        return getattr(reference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
