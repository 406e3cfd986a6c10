"""How a job runs: Ray start-up (`init_ray`), what the cluster offers a stage (`node_cpus`, `free_node_cpus`,
`default_gpus`) and the job's end (`run_job`).

A job that fails ends with one line, ``error: <ExceptionType>: <message> (<where>)``, naming the exception that
user code raised, even when it was raised in a Ray actor, task or training worker (`causes.root_cause` takes Ray's
wrappers off). Bad input exits with status 2 and that line alone; anything else is a bug, so its traceback (with
the worker's, which Ray embeds) is printed above the line and the status is 1. ``RABTRIEVER_TRACEBACK=1`` prints
the traceback for bad input too.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from .causes import root_cause

# A job's bad input: a config, data or output-folder problem. ConfigError is a ValueError.
BAD_INPUT = (FileExistsError, FileNotFoundError, ValueError)
TRACEBACK_ENV = "RABTRIEVER_TRACEBACK"


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


def node_cpus() -> float:
    """CPUs of the largest alive node (what one sampler actor may use while nothing else runs)."""
    import ray

    return max(n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"])


def free_node_cpus() -> float:
    """CPUs one task may take now: the largest node's, less what others hold (a Serve app building its demo)."""
    import ray

    return min(node_cpus(), ray.available_resources().get("CPU", 0.0))


def default_gpus(requested: float | None, use_gpu: bool = True) -> float:
    """GPUs per actor: ``requested`` when the cluster has GPUs (None: 1), 0 when it has none or ``use_gpu`` is
    off. The one place the Ray stages decide whether to ask for GPUs."""
    import ray

    if not use_gpu or ray.cluster_resources().get("GPU", 0) <= 0:
        return 0.0
    return 1.0 if requested is None else requested


def warn_if_no_cpu_left_for_data(cfg) -> None:
    """Ray Data runs a distillation's stage (teacher actors or Parquet reads) on the CPUs its training workers
    (``cfg``, a `DistillConfig`) leave free: warn when the cluster has too few for both."""
    import logging

    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    workers = cfg.cpus_per_worker * cfg.num_workers
    needed = workers + (0.25 if cfg.teacher_data else cfg.teacher_cpus)
    if total < needed:
        logging.getLogger(__name__).warning(
            "the cluster has %.2f CPUs now; %d workers x cpus_per_worker=%.2f leave too few for the data stage "
            "(it needs %.2f). Training waits until an autoscaler adds CPUs; on a fixed cluster lower "
            "cpus_per_worker or teacher_cpus.",
            total,
            cfg.num_workers,
            cfg.cpus_per_worker,
            needed - workers,
        )


def teacher_threads(requested: int, cpus_per_actor: float, actors: int) -> int | None:
    """Torch threads of each teacher actor streaming a distillation's training pairs: ``requested``; with 0, on a
    one-node cluster (local Ray) the node's CPUs shared among the ``actors`` (at least each actor's own), since
    the training workers there mostly wait for the teacher while it scores, and on several nodes None (Ray's
    default: ``cpus_per_actor`` rounded down)."""
    import ray

    if requested:
        return requested
    if len([node for node in ray.nodes() if node.get("Alive")]) != 1:
        return None
    return max(int(cpus_per_actor), int(node_cpus() // actors), 1)
