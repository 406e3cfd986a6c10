"""Atomic outputs: files and folders that are either complete or absent.

Outputs are written into a hidden staging folder beside the target and renamed into place only when complete
(manifest last), so an interrupted run never leaves a folder that looks finished, and a finished one is never
overwritten by accident. Files and folders are fsynced before they are renamed, and the parent folder after, so a
power loss cannot leave a renamed folder with empty files. Replacing a folder takes two renames (the old one
aside, the new one in); a crash between them is repaired by the next run, which puts the old folder back. Staging
folders of runs that died (their process is gone, or, written from another machine, a day old) are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
OWNER = ".owner"  # in a staging folder: "host pid" of the process writing it
STALE_AFTER_S = 24 * 3600  # a staging folder of another machine's run is abandoned after this long


class OutputExistsError(FileExistsError):
    """The output folder already holds a finished run."""


def write_text_atomic(path: str | Path, text: str, keep_mode: bool = False) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path`` (``keep_mode``: with the
    permissions of the file it replaces)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    if keep_mode:
        shutil.copymode(path, tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    """Make a folder's entries (renames, new files) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (before it is renamed into place)."""
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _abandoned(staging: Path) -> bool:
    """Whether a staging folder belongs to a run that is gone: its process died on this machine, or it was written
    elsewhere (or by a version that recorded no owner) more than `STALE_AFTER_S` ago."""
    try:
        host, pid = (staging / OWNER).read_text().split()
        if host == socket.gethostname():
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return True
            except PermissionError:  # alive, another user's
                return False
            return False
    except (OSError, ValueError):
        pass
    try:
        return time.time() - staging.stat().st_mtime > STALE_AFTER_S
    except FileNotFoundError:
        return False


def recover(out: str | Path) -> None:
    """Repair what an interrupted run left beside ``out``: put back the previous folder when a crash fell between
    `commit_dir`'s two renames, remove an old copy a finished replacement left, and remove abandoned staging
    folders (`_abandoned`), never a live run's."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for old in sorted(out.parent.glob(f".{out.name}.old-*")):
        if not out.exists():
            os.rename(old, out)  # the crash came after the old folder was moved aside: it is the output
        else:
            shutil.rmtree(old, ignore_errors=True)
    for staging in out.parent.glob(f".{out.name}.partial-*"):
        if _abandoned(staging):
            shutil.rmtree(staging, ignore_errors=True)


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON to a temporary file beside ``path``, then rename it over ``path``."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def staging_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Check that ``out`` may be written and return a fresh staging folder beside it.

    Refuses (`OutputExistsError`) when ``out`` exists and is not empty, unless ``overwrite``.
    """
    out = Path(out)
    recover(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        finished = (out / MANIFEST).is_file()
        what = "a finished run" if finished else "files"
        raise OutputExistsError(
            f"{out} already holds {what}; pass --overwrite to replace it, or choose another --out"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    (staging / OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
    return staging


def commit_dir(staging: Path, out: str | Path) -> None:
    """Move a complete staging folder to ``out``, replacing what was there; durable once it returns."""
    out = Path(out)
    (staging / OWNER).unlink(missing_ok=True)
    _fsync_tree(staging)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(staging, out)
    _fsync_dir(out.parent)
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
