"""Atomic outputs: files and folders that are either complete or absent.

Outputs are written into a hidden staging folder beside the target and renamed into place only when complete
(manifest last), so an interrupted run never leaves a folder that looks finished, and a finished one is never
overwritten by accident.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class OutputExistsError(FileExistsError):
    """The output folder already holds a finished run."""


def write_text_atomic(path: str | Path, text: str, keep_mode: bool = False) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path`` (``keep_mode``: with the
    permissions of the file it replaces)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text, encoding="utf-8")
    if keep_mode:
        shutil.copymode(path, tmp)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it over ``path``."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def staging_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Check that ``out`` may be written and return a fresh staging folder beside it.

    Refuses (`OutputExistsError`) when ``out`` exists and is not empty, unless ``overwrite``.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        finished = (out / MANIFEST).is_file()
        what = "a finished run" if finished else "files"
        raise OutputExistsError(
            f"{out} already holds {what}; pass --overwrite to replace it, or choose another --out"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    return staging


def commit_dir(staging: Path, out: str | Path) -> None:
    """Move a complete staging folder to ``out``, replacing what was there."""
    out = Path(out)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Write the folder ``out`` atomically: yields a fresh staging folder beside it (`staging_dir`, which refuses
    an ``out`` that holds files unless ``overwrite``), renames it to ``out`` when the block ends (`commit_dir`),
    and removes it when the block raises, so ``out`` is either the complete new folder or what it was before."""
    staging = staging_dir(out, overwrite)
    try:
        yield staging
        commit_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
