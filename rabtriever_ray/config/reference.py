"""docs/configuration.md's configuration reference, generated from the config dataclasses; tests/test_config.py
checks it.

    python -m rabtriever_ray.config.reference --write    # rewrite the block between the page's markers
    python -m rabtriever_ray.config.reference --check    # exit status 1 when the block is stale
    python -m rabtriever_ray.config.reference            # print the reference

Not on the runtime path: no library module imports this one.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

from .base import ConfigError
from .loading import flat_fields, type_name
from .offline import EvaluateConfig, IndexConfig, ScoreTeacherConfig
from .schema import DistillConfig, TeacherTrainConfig
from .sections import TeacherConfig
from .serving import ServeConfig

REFERENCE_PAGE = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
REFERENCE_START = "<!-- config-reference:start -->"
REFERENCE_END = "<!-- config-reference:end -->"
REGENERATE = "python -m rabtriever_ray.config.reference --write"

# The top-level configs (nested ones are expanded under them), each with who reads it and how to override it.
REFERENCE_CONFIGS: tuple[tuple[type, str], ...] = (
    (
        TeacherConfig,
        "The `teacher` section of every job's config (configs/teacher/*.yaml hold whole ones): in a job's YAML a "
        "mapping, a teacher YAML path or a model spec (`teacher: runs/my_teacher` sets `teacher.model`); on the "
        "command line `--teacher configs/teacher/x.yaml` or `--teacher MODEL`, then dotted overrides "
        "(`teacher.prompt.max_doc_tokens=256`). The ServeConfig key `teacher` takes a YAML or a model spec.",
    ),
    (
        DistillConfig,
        "Read by `jobs/distill.py` from `--config configs/*.yaml`, then trailing `key=value` overrides "
        "(`loss.w_jepa=0.5 student.proj_dim=128`); the ServeConfig key `demo_distill` takes the same overrides.",
    ),
    (
        TeacherTrainConfig,
        "Read by `jobs/train_teacher.py` from `--config configs/teacher_train/*.yaml`, then a flag per top-level "
        "key (`--lora`, `--data DIR`, `--model M` for `--teacher M`), then trailing `key=value` overrides "
        "(`lora=true epochs=2`).",
    ),
    (
        ScoreTeacherConfig,
        "Read by `jobs/score_teacher.py` from `--config configs/score_teacher/*.yaml`, then a flag per top-level "
        "key (`--data D --out O --max-queries 20`; `--model M` for `--teacher M`), then trailing `key=value` "
        "overrides (`teacher.prompt.max_doc_tokens=256`).",
    ),
    (
        IndexConfig,
        "Read by `jobs/index.py` from `--config configs/index/*.yaml`, then a flag per top-level key "
        "(`--checkpoint C --index-type hnsw --actors 1:4`), then trailing `key=value` overrides.",
    ),
    (
        EvaluateConfig,
        "Read by `jobs/evaluate.py` from `--config configs/evaluate/*.yaml`, then a flag per top-level key "
        "(`--methods bm25,teacher --teacher configs/teacher/x.yaml`), then trailing `key=value` overrides.",
    ),
    (
        ServeConfig,
        "The args of `rabtriever_ray.serve:build_app`: `key=value` after `serve run "
        "rabtriever_ray.serve:build_app` (`encoder.num_gpus=0.5`), or the `args` mapping of "
        "`cluster/serve.yaml` (sections nested).",
    ),
)


def config_reference_markdown() -> str:
    """The configuration reference: per top-level config a ``####`` heading, who reads it and a table
    ``| key | type | default | meaning |`` with a row per dotted key (a section's row comes before its keys)."""
    sections = []
    for cls, usage in REFERENCE_CONFIGS:
        rows = []
        for key, f, field_type, default in flat_fields(cls):
            if dataclasses.is_dataclass(field_type):
                type_cell, default_cell = f"`{field_type.__name__}`", f"`{key}.*` below"
            else:
                type_cell, default_cell = _markdown_type(field_type), _markdown_default(default)
            help_cell = f.metadata["help"].replace("|", r"\|").replace("<", r"\<")  # \< : not an HTML tag
            rows.append(f"| `{key}` | {type_cell} | {default_cell} | {help_cell} |")
        header = [
            f"#### {cls.__name__}",
            "",
            usage,
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        sections.append("\n".join(header + rows))
    return "\n\n".join(sections)


def _markdown_type(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return r" \| ".join(f"`{a}`" for a in typing.get_args(tp))
    return f"`{type_name(tp)}`".replace("|", r"\|")


def _markdown_default(value: Any) -> str:
    """A default as YAML and the command line take it: numbers and booleans bare, the rest as code."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        text = "[" + ", ".join(map(str, value)) + "]"
    else:
        text = str(value) or '""'  # None stays None: both YAML (as null) and overrides take it
    return f"`{text}`".replace("|", r"\|")


def _split_page(text: str, page: Path) -> tuple[str, str, str]:
    """(the text up to and with the start marker, the block between the markers, the end marker and after)."""
    if (
        text.count(REFERENCE_START) != 1
        or text.count(REFERENCE_END) != 1
        or text.find(REFERENCE_END) < text.find(REFERENCE_START)
    ):
        raise ConfigError(f"{page}: expected one {REFERENCE_START} line, then one {REFERENCE_END} line")
    head, rest = text.split(REFERENCE_START)
    block, tail = rest.split(REFERENCE_END)
    return head + REFERENCE_START, block, REFERENCE_END + tail


def documented_config_reference(page: str | Path = REFERENCE_PAGE) -> str:
    """The block between the page's config-reference markers, without the blank lines around it."""
    page = Path(page)
    return _split_page(page.read_text(encoding="utf-8"), page)[1].strip("\n")


def write_config_reference(page: str | Path = REFERENCE_PAGE) -> bool:
    """Regenerate the block between the page's markers, keeping the rest of the file as it is; returns whether
    the file changed. Written to a temporary file beside it, then renamed over it."""
    page = Path(page)
    text = page.read_text(encoding="utf-8")
    head, _, tail = _split_page(text, page)
    new = f"{head}\n\n{config_reference_markdown()}\n\n{tail}"
    if new == text:
        return False
    from ..io import write_text_atomic

    write_text_atomic(page, new, keep_mode=True)
    return True


def main(argv: list[str] | None = None) -> None:
    """Print the configuration reference, write it into docs/configuration.md (``--write``) or check it
    (``--check``, exit status 1 when stale); ``--file`` names another page with the two markers."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m rabtriever_ray.config.reference",
        description="The configuration reference (markdown tables) generated from the config dataclasses.",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--write",
        action="store_true",
        help="replace the page's block between the config-reference markers",
    )
    action.add_argument(
        "--check", action="store_true", help="exit with status 1 when the page's block is stale"
    )
    parser.add_argument(
        "--file", type=Path, default=REFERENCE_PAGE, help="the page to write or check (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.check:
        if documented_config_reference(args.file) != config_reference_markdown():
            parser.exit(1, f"{args.file}: the configuration reference is stale; run {REGENERATE}\n")
        print(f"{args.file}: the configuration reference is current")
    elif args.write:
        changed = write_config_reference(args.file)
        print(f"{args.file}: the configuration reference {'updated' if changed else 'was already current'}")
    else:
        print(config_reference_markdown())


if __name__ == "__main__":
    from ..runtime import run_job

    run_job(main)
