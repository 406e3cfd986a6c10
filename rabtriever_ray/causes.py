"""The cause of a failure: the exception user code raised, found under Ray's wrappers, and where it was raised.

`root_cause` walks Ray's error objects wherever they hold the exception itself: ``RayTaskError.cause`` (what a
task or actor method raised), the ``RayTaskError`` a failed actor ``__init__`` left in its ``RayActorError``,
``RaySystemError.client_exc``, ``UserCodeException.__cause__`` and Ray Train's ``WorkerGroupError.worker_failures``
and ``ControllerError.controller_failure``.

Three things Ray gives only as traceback text, so they are read from it with the regular expressions below:

- where a task error was raised: the exception ``ray.get`` raises is a "dual" ``RayTaskError(X)`` (an instance of
  both), built by ``as_instanceof_cause`` with the cause alone; the worker's proctitle, pid and ip survive only in
  its message, as the header Ray writes above the worker's traceback;
- what a Ray Data UDF raised: Ray Data wraps it in a ``UserCodeException`` whose ``__cause__`` is lost when the
  wrapper is pickled to the driver, leaving the UDF's exception in the traceback text alone;
- an exception that could not cross processes: Ray replaces an unpicklable one by a plain ``RayError``, and one the
  driver cannot unpickle by an ``UnserializableException``, each holding the original only as text.
"""

from __future__ import annotations

import importlib
import re
import sys
from dataclasses import dataclass

from . import raycompat


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
    ``ControllerError``. A Ray Data UDF's exception reaches the driver only as traceback text (see the module
    docstring), so its type and message are read from that text: the last exception in the chain that is not Ray's
    wrapper, i.e. what the UDF raised, not what that chained from. An exception that is none of these is its own
    cause.
    """
    where = None
    while "ray" in sys.modules:  # an error from before Ray was imported cannot be Ray's
        import ray.exceptions as rex

        if isinstance(err, rex.RayTaskError):
            text = _ANSI.sub("", str(err))
            cause = err.cause
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
        elif (init_error := raycompat.actor_init_error(err)) is not None:
            err = init_error  # the actor's __init__ raised
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
        elif (user_error := raycompat.train_user_exception(err)) is not None:
            err = user_error  # should Ray Train's wrapper of a worker's exception reach the driver
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
