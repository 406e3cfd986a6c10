"""Ray start-up, job failures reported as their cause, and atomic outputs.

A job that fails ends with one line, ``error: <ExceptionType>: <message> (<where>)``, naming the exception that
user code raised, even when it was raised in a Ray actor, task or training worker (`root_cause` takes Ray's
wrappers off). Bad input exits with status 2 and that line alone; anything else is a bug, so its traceback (with
the worker's, which Ray embeds) is printed above the line and the status is 1. ``RABTRIEVER_TRACEBACK=1`` prints
the traceback for bad input too.

Outputs are written into a hidden staging folder beside the target and renamed into place only when complete
(manifest last), so an interrupted run never leaves a folder that looks finished, and a finished one is never
overwritten by accident.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import sys
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


class OutputExistsError(FileExistsError):
    """The output folder already holds a finished run."""


def init_ray(**kwargs: Any) -> None:
    """Connect to the cluster named by ``RAY_ADDRESS`` (as under ``ray job submit``) or start local Ray.

    Does nothing when Ray is already initialised in this process (tests, notebooks).
    """
    import ray

    from .console import ray_init_options

    if ray.is_initialized():
        return
    kwargs = {**ray_init_options(), **kwargs}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        ray.init(**kwargs)


# A job's bad input: a config, data or output-folder problem. ConfigError is a ValueError.
BAD_INPUT = (FileExistsError, FileNotFoundError, ValueError)
TRACEBACK_ENV = "RABTRIEVER_TRACEBACK"


def run_job(main: Callable[[], Any], bad_input: tuple[type[BaseException], ...] = BAD_INPUT) -> None:
    """Run a job script's ``main``; a failure ends with one ``error:`` line naming its `root_cause`.

    Bad input (``bad_input``, also when raised inside a Ray actor or worker) exits with status 2 and that line
    alone; any other exception prints its traceback first and exits with status 1.
    """
    try:
        main()
    except Exception as err:
        cause = root_cause(err)
        bad = cause.type is not None and issubclass(cause.type, bad_input)
        if not bad or os.environ.get(TRACEBACK_ENV) == "1":
            traceback.print_exception(err, file=sys.stderr)
        print(f"error: {cause}", file=sys.stderr)
        sys.exit(2 if bad else 1)


@dataclass(frozen=True)
class Cause:
    """The exception user code raised, found under Ray's wrappers by `root_cause`.

    ``str()`` is the one-line report: ``ValueError: <message> (in Ray Data actor MapBatches(TeacherScorer), pid 12
    on 10.0.0.3)``.
    """

    type_name: str  # as a traceback prints it: "ValueError", "rabtriever_ray.models.ModelLoadError"
    message: str
    type: type[BaseException] | None  # None when only the name came back and no loaded module defines it
    where: str | None = None  # "in Ray task f, pid ...", "in training worker rank 0"; None: in this process

    def __str__(self) -> str:
        message = " ".join(self.message.split())  # one line, even for multi-line messages
        line = self.type_name.rpartition(".")[2] + (f": {message}" if message else "")
        return line + (f" ({self.where})" if self.where else "")


def root_cause(err: BaseException) -> Cause:
    """The exception user code raised, with Ray's wrappers taken off, and where it was raised.

    Unwraps ``RayTaskError`` (``.cause``), an ``ActorDiedError`` from a failed ``__init__`` (the task error it was
    built from), Ray Data's ``UserCodeException`` and Ray Train's ``WorkerGroupError`` (the lowest failed rank) and
    ``ControllerError``. A Ray Data UDF's exception reaches the driver only as traceback text (the
    ``UserCodeException`` loses its ``__cause__`` when pickled), so its type and message are read from that text:
    the last exception in the chain that is not Ray's wrapper, i.e. what the UDF raised, not what that chained from.
    An exception that is none of these is its own cause.
    """
    where = None
    while "ray" in sys.modules:  # an error from before Ray was imported cannot be Ray's
        import ray.exceptions as rex

        if isinstance(err, rex.RayTaskError):
            text = _ANSI.sub("", str(err))
            cause = vars(err).get("cause")  # vars: a dual RayTaskError(X) forwards other attributes to X
            # Only the traceback text is left when Ray Data's wrapper lost its __cause__ in pickling, or when Ray
            # replaced an unpicklable exception by a plain RayError.
            lost = isinstance(cause, rex.UserCodeException) and cause.__cause__ is None
            found = _cause_in_text(text, where) if lost or type(cause) is rex.RayError else None
            if found is not None:
                return found
            if not isinstance(cause, BaseException):
                break
            where = _task_where(text) or where
            err = cause
        elif isinstance(err, rex.UnserializableException):  # the driver could not unpickle the exception
            return _cause_in_text(str(err), where) or Cause(_qualified(type(err)), str(err), type(err), where)
        elif isinstance(err, rex.RayActorError) and err.args and isinstance(err.args[0], rex.RayTaskError):
            err = err.args[0]  # the actor's __init__ raised; Ray keeps the task error as the first argument
        elif isinstance(err, rex.RaySystemError) and isinstance(err.client_exc, BaseException):
            err = err.client_exc  # e.g. the ModuleNotFoundError of a worker that cannot unpickle its function
        elif isinstance(err, rex.UserCodeException) and err.__cause__ is not None:
            err = err.__cause__
        elif isinstance(getattr(err, "worker_failures", None), dict) and err.worker_failures:
            failures = err.worker_failures  # ray.train.WorkerGroupError: rank -> exception
            rank = min(failures)
            others = f", one of {len(failures)} failed ranks" if len(failures) > 1 else ""
            where = f"in training worker rank {rank}{others}"
            err = failures[rank]
        elif isinstance(getattr(err, "controller_failure", None), BaseException):
            where = "in the Ray Train controller"  # ray.train.ControllerError
            err = err.controller_failure
        elif isinstance(getattr(err, "_base_exc", None), BaseException):
            err = err._base_exc  # Ray Train's UserExceptionWithTraceback, should it reach the driver
        else:
            break
    name = type(err).__name__ if type(err).__module__ == "builtins" else _qualified(type(err))
    return Cause(name, str(err), type(err), where)


_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the worker header
# Ray's header above a worker traceback: "ray::MapWorker(MapBatches(F)).submit() (pid=12, ip=10.0.0.3, actor_id=..."
_TASK_HEADER = re.compile(
    r"ray::(?P<title>.+?)\(\) \(pid=(?P<pid>\d+), ip=(?P<ip>[^,)]+)(?P<actor>, actor_id=)?"
)
_CHAIN = re.compile(
    r"^(?:The above exception was the direct cause of the following exception:"
    r"|During handling of the above exception, another exception occurred:)$",
    re.MULTILINE,
)
_FRAME_OR_HEADER = re.compile(r'  File "|ray::|Traceback \(most recent call last\):')
_EXCEPTION_LINE = re.compile(r"^(?P<name>[A-Za-z_][\w.]*)(?:: (?P<message>.*))?$")


def _task_where(text: str) -> str | None:
    """Where a Ray task error was raised: the last (innermost) worker header in its text."""
    headers = list(_TASK_HEADER.finditer(text))
    if not headers:
        return None
    header = headers[-1]
    title, node = header["title"], f"pid {header['pid']} on {header['ip']}"
    data_actor = re.fullmatch(r"MapWorker\((?P<op>.+)\)\.(?P<method>\w+)", title)
    if data_actor:
        starting = " while starting" if data_actor["method"] == "__init__" else ""
        return f"in Ray Data actor {data_actor['op']}{starting}, {node}"
    return f"in Ray {'actor' if header['actor'] else 'task'} {title}, {node}"


def _cause_in_text(text: str, where: str | None) -> Cause | None:
    """The last exception in a traceback text that is not Ray's wrapper of it, where its worker header says."""
    import ray.exceptions as rex

    text = _ANSI.sub("", text)
    separators = list(_CHAIN.finditer(text))
    starts = [0, *(m.end() for m in separators)]
    ends = [*(m.start() for m in separators), len(text)]
    found = []
    for block_start, block_end in zip(starts, ends):
        lines = text[block_start:block_end].splitlines(keepends=True)
        # The exception follows the header and the last frame ('  File "...", line N' and its indented source).
        first = max((i + 1 for i, line in enumerate(lines) if _FRAME_OR_HEADER.match(line)), default=0)
        while first < len(lines) and lines[first].startswith("    "):
            first += 1
        match = _EXCEPTION_LINE.match(lines[first].rstrip("\n")) if first < len(lines) else None
        if match:
            message = "".join([match["message"] or "", "\n", *lines[first + 1 :]]).strip()
            found.append((match["name"], message, block_start + sum(map(len, lines[:first]))))
    for name, message, at in reversed(found):
        cls = _exception_class(name)
        if not (cls is not None and issubclass(cls, (rex.UserCodeException, rex.RayTaskError))):
            return Cause(name, message, cls, _task_where(text[:at]) or where)
    return None


def _exception_class(name: str) -> type[BaseException] | None:
    """The exception class a traceback names, if this process has (or, for our own package, can import) it."""
    module_name, _, class_name = name.rpartition(".")
    module_name = module_name or "builtins"
    module = sys.modules.get(module_name)
    if module is None and module_name.split(".")[0] == __name__.split(".")[0]:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            return None
    cls = getattr(module, class_name, None)
    return cls if isinstance(cls, type) and issubclass(cls, BaseException) else None


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


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
