"""What a job shows on the console: one progress bar per stage, and Ray's own log lines in a file.

- `quiet_ray(log_file, verbose)`: unless ``verbose``, the log lines of Ray's driver-side loggers (``ray``,
  ``ray.data``, ``ray.train``, ...), of transformers, of Ray's core worker in this process (file descriptor 2)
  and this package's INFO lines go to ``log_file``; Ray Data's own progress output is off, and actors and
  training workers keep their output in Ray's session logs (``/tmp/ray/session_latest/logs``) instead of
  forwarding it to the driver. Warnings of this package and tracebacks still reach the console. It must run
  before Ray starts in this process.
- `stage(title)`: a progress bar for one stage of a job; it ends with the stage's wall time.
- `collect_rows(dataset, bar)`: a Ray Dataset materialised into one Arrow table, moving ``bar`` by rows.
- `StepProgress`: a Ray Train callback that moves a driver-side bar as the workers report their step.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "filelock")
_quiet = False
_deepspeed_log = None


def quiet_ray(log_file: str | Path, verbose: bool = False) -> None:
    """Route Ray's and this package's log lines to ``log_file`` (see the module docstring); ``verbose``: leave
    everything on the console, as Ray prints it."""
    global _quiet
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    global _deepspeed_log
    _deepspeed_log = open(log_file, "a")  # noqa: SIM115 (kept open: DeepSpeed's handler and fd 2 write to it)
    # Ray's core worker in this process writes its own warnings to file descriptor 2 directly (one per teacher
    # actor pool: its constructor arguments sit in the object store). Point that descriptor at the log file and
    # rebind Python's stderr to a copy of the console's, so bars, this package's warnings and tracebacks still
    # reach the console.
    sys.stderr.flush()
    console = os.fdopen(os.dup(2), "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    os.dup2(_deepspeed_log.fileno(), 2)
    sys.stderr = console
    to_file = logging.FileHandler(log_file)
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    to_console = logging.StreamHandler(sys.stderr)
    to_console.setLevel(logging.WARNING)
    to_console.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    package = logging.getLogger("rabtriever_ray")
    package.setLevel(logging.INFO)
    package.handlers = [to_file, to_console]
    package.propagate = False
    for name in _RAY_LOGGERS:
        logger = logging.getLogger(name)
        logger.handlers = [to_file]
        logger.propagate = False

    import ray.data
    import transformers

    # DeepSpeed logs to a stdout handler it makes at import (transformers imports it to save a model), so it is
    # imported here with stdout pointing at the log file (the handler writes to it from then on).
    with contextlib.redirect_stdout(_deepspeed_log):
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            pass

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    context.print_on_execution_start = False
    transformers.logging.disable_progress_bar()
    transformers.logging.set_verbosity_error()
    _quiet = True


def ray_init_options() -> dict[str, Any]:
    """Extra `ray.init` options: in quiet mode, no worker output forwarded and no Ray banner."""
    return {"log_to_driver": False, "logging_level": logging.WARNING} if _quiet else {}


class _Bar:
    """A stage's bar when the console is not quiet: accepts the same calls and shows nothing."""

    n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def refresh(self) -> None:
        pass


@contextlib.contextmanager
def stage(title: str, total: int | None = None, unit: str = "it") -> Iterator[Any]:
    """A progress bar for one stage (``total`` units, or a running clock when unknown), closed with the stage's
    wall time. Shown only in quiet mode; with Ray's own output on the console it would be torn apart."""
    if not _quiet:
        yield _Bar()
        return
    from tqdm.auto import tqdm

    started = time.perf_counter()
    bar = tqdm(
        total=total,
        desc=title,
        unit=unit,
        dynamic_ncols=True,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} {unit} [{elapsed}]"
        if total
        else "{desc} [{elapsed}]",
    )
    # A clock thread keeps [elapsed] moving while the stage waits on Ray.
    done = threading.Event()

    def tick() -> None:
        while not done.wait(1.0):
            bar.refresh()

    clock = threading.Thread(target=tick, daemon=True)
    clock.start()
    try:
        yield bar
    finally:
        done.set()
        clock.join()
        if bar.total:
            bar.n = bar.total
        bar.set_description_str(f"{title} (done in {time.perf_counter() - started:.0f} s)", refresh=False)
        bar.close()


def collect_rows(dataset, bar) -> Any:
    """Execute a Ray Dataset and concatenate its blocks into one ``pyarrow.Table`` in the driver, moving ``bar``
    by the rows of each block as it arrives."""
    import pyarrow as pa

    tables = []
    for block in dataset.iter_batches(
        batch_size=None, batch_format="pyarrow"
    ):  # whole blocks, as they finish
        tables.append(block)
        bar.update(block.num_rows)
    return pa.concat_tables(tables)


def step_progress(bar) -> tuple[Any, Any]:
    """``(callback, stop)``: a Ray Train callback reporting each ``step`` the workers report to ``bar`` (through a
    small queue actor), and the function that stops the driver's reader. ``(None, None)`` when not quiet."""
    if not _quiet:
        return None, None
    from ray.util.queue import Empty, Queue

    queue = Queue(actor_options={"num_cpus": 0})
    stopped = threading.Event()

    def read() -> None:
        while not stopped.is_set():
            try:
                step = queue.get(timeout=0.5)
            except Empty:
                continue
            bar.n = max(bar.n, int(step))
            bar.refresh()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def stop() -> None:
        stopped.set()
        reader.join()
        queue.shutdown()

    return StepProgress(queue), stop


def _user_callback_base():
    from ray.train import UserCallback

    return UserCallback


class StepProgress(_user_callback_base()):
    """Ray Train callback (runs in the controller): puts rank 0's reported ``step`` on a queue for the driver."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics, checkpoint) -> None:
        step = metrics[0].get("step") if metrics else None
        if step is not None:
            self.queue.put_nowait(step)
