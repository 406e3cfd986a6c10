"""Every use of Ray's private API (pinned: Ray 2.60) in the library, the jobs and the benchmarks, in one place.

Each function reads one thing that Ray keeps private and offers no public way to get; its docstring names the
attribute and why nothing public does. tests/test_raycompat.py checks each against the installed Ray, so an upgrade
that renames or removes one fails there, by name, instead of deep inside a training run or a job's error report.

Nothing here imports Ray at module level: `causes` reads Ray Train's wrapper on every job's failure path, also for
failures from before Ray was imported.
"""

from __future__ import annotations

from typing import Any

# -- ray.train.DataConfig ----------------------------------------------------------------------------------------
# A `DataConfig` subclass that overrides ``configure`` (a DeveloperAPI, `raytrain.WholeBlockSplit`) must still
# honour the constructor's arguments, which DataConfig keeps only as private attributes.


def datasets_to_split(config: Any, names: set[str]) -> set[str]:
    """The datasets among ``names`` that ``config`` (a `ray.train.DataConfig`) splits between the workers: its
    ``datasets_to_split`` argument ("all" or a list), kept as ``_datasets_to_split``."""
    chosen = config._datasets_to_split
    return set(names) if chosen == "all" else set(chosen) & set(names)


def shard_locality(config: Any) -> bool:
    """Whether ``config`` (a `ray.train.DataConfig`) splits with the workers' nodes as locality hints: its
    ``enable_shard_locality`` argument, kept as ``_enable_shard_locality``."""
    return config._enable_shard_locality


def execution_options(config: Any, name: str) -> Any:
    """The Ray Data ``ExecutionOptions`` (a copy) that ``config`` (a `ray.train.DataConfig`) gives the shards of
    dataset ``name``: its ``execution_options`` argument for that dataset, else ``DataConfig.default_ingest_options``
    (``_resolve_execution_options``)."""
    return config._resolve_execution_options(name)


# -- errors --------------------------------------------------------------------------------------------------------


def train_user_exception(err: BaseException) -> BaseException | None:
    """What a training worker's code raised, when ``err`` is Ray Train's wrapper of it, else None.

    The wrapper, ``UserExceptionWithTraceback`` (in ``ray.train.v2._internal``), keeps the exception as
    ``_base_exc``; Ray Train unwraps it before the driver sees it, but not on every path.
    """
    base = getattr(err, "_base_exc", None)
    return base if isinstance(base, BaseException) else None


def actor_init_error(err: BaseException) -> BaseException | None:
    """The ``RayTaskError`` of a failed actor ``__init__``, when ``err`` is the ``RayActorError`` that Ray built from
    it (``ActorDiedError(task_error)``, whose only record of it is its first argument), else None."""
    import ray.exceptions

    if isinstance(err, ray.exceptions.RayActorError) and err.args:
        first = err.args[0]
        return first if isinstance(first, ray.exceptions.RayTaskError) else None
    return None


# -- Ray Serve -----------------------------------------------------------------------------------------------------


def serve_details() -> dict:
    """Serve's details of this cluster (what ``serve status`` and the dashboard read): per application and
    deployment, its replicas with their ``state`` and ``pid``.

    From the Serve controller's client (``ray.serve.context._get_global_client``): the public ``serve.status()``
    counts replicas by state but names none of their processes.
    """
    from ray.serve.context import _get_global_client

    return _get_global_client().get_serve_details()


def serve_http_host() -> str | None:
    """The address Serve's HTTP proxies bind, from the controller's HTTP options; None outside a Serve replica."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.exceptions import RayServeException

    try:
        serve.get_replica_context()
    except RayServeException:
        return None
    return _get_global_client().http_config.host
