"""Where the readers' tasks run: in Ray, or here and now.

The readers (`checks.read_checked`) are written once as tasks: read a shard, check a hash bucket of ids, filter a
table. `RayTasks` runs them as Ray tasks (any size: the driver holds object references and counts); `LocalTasks`
runs the same functions in this process (a small folder, where starting Ray would cost more than the work).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any


class LocalTasks:
    """Runs each task in this process when it is submitted; its result is its own reference."""

    in_ray = False

    def submit(self, fn: Callable, *args: Any, returns: int = 1, cpus: float = 1.0) -> Any:
        return fn(*args)

    def get(self, refs: Any) -> Any:
        return refs


class RayTasks:
    """Runs each task as a Ray task of ``cpus`` CPUs with ``returns`` outputs (a list of references if more
    than one)."""

    in_ray = True

    def submit(self, fn: Callable, *args: Any, returns: int = 1, cpus: float = 1.0) -> Any:
        return _remote(fn).options(num_returns=returns, num_cpus=cpus).remote(*args)

    def get(self, refs: Any) -> Any:
        import ray

        return ray.get(refs)


@functools.cache
def _remote(fn: Callable):
    import ray

    return ray.remote(fn)
