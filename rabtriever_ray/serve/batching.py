"""Dynamic batching shared by the model deployments (`BatchedModel`).

Every model method is dynamically batched (``@serve.batch``): concurrent requests are queued and run as one model
call of up to ``max_batch_size`` requests, after waiting at most ``batch_wait_timeout_s`` for the batch to fill.
The model runs in one worker thread per replica, so the event loop keeps accepting requests (and answering health
checks) while a batch runs. Requests that arrive meanwhile wait until it ends and then form the next batch together
(`BatchedModel._admit`); Serve alone would already form it from the one or two requests that came within the
wait. ``reconfigure`` (Serve's ``user_config``) changes both settings live.

A model thread that hangs (or a batch that runs far past its deadline) fails Serve's health check
(`BatchedModel.check_health`): the Router answered its requests 504 at ``model_timeout_s``, and Serve replaces the
replica instead of letting the batch hold the admission gate shut.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from ray.serve.metrics import Histogram

from ..config import ConfigError, ServeConfig


class BatchedModel:
    """What the two model deployments share: one model thread, batch settings, and batch-size bookkeeping.

    ``BATCHED`` names the ``@serve.batch`` methods; `stats` returns, per method, how many batches ran and their
    sizes (also the Prometheus histogram ``rabtriever_batch_size``).
    """

    BATCHED: tuple[str, ...] = ()

    def _start_batching(self, config: ServeConfig) -> None:
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        # Set while no batch runs on the model thread; see `_admit`.
        self._model_free = asyncio.Event()
        self._model_free.set()
        self._running = 0
        self._batch_started: float | None = None  # when the batch on the model thread started
        self._hung_after_s = 2 * config.model_timeout_s
        self._batch_sizes = {name: collections.Counter() for name in self.BATCHED}
        self._batch_size_metric = Histogram(
            "rabtriever_batch_size",
            description="Requests per model call (dynamic batching).",
            boundaries=[1, 2, 4, 8, 16, 32, 64, 128],
            tag_keys=("method",),
        )
        self.reconfigure(
            {"max_batch_size": config.max_batch_size, "batch_wait_timeout_s": config.batch_wait_timeout_s}
        )

    def reconfigure(self, user_config: dict) -> None:
        """Serve's ``user_config``: ``max_batch_size`` and / or ``batch_wait_timeout_s``, changed live."""
        unknown = set(user_config) - {"max_batch_size", "batch_wait_timeout_s"}
        if unknown:
            raise ConfigError(
                f"user_config: unknown keys {sorted(unknown)}; use max_batch_size, batch_wait_timeout_s"
            )
        self._batch_settings = {**getattr(self, "_batch_settings", {}), **user_config}
        for name in self.BATCHED:
            method = getattr(self, name)
            method.set_max_batch_size(int(self._batch_settings["max_batch_size"]))
            method.set_batch_wait_timeout_s(float(self._batch_settings["batch_wait_timeout_s"]))

    async def _admit(self) -> None:
        """Wait until no batch runs, then let the caller join a ``@serve.batch`` queue.

        Serve (2.60) forms the next batch while the previous one still runs (``max_concurrent_batches`` only
        limits how many run), so without this gate a busy replica queues batches of the one or two requests that
        came in during ``batch_wait_timeout_s``. Requests that arrive during a batch wait here instead and join
        the queue together when the model thread frees: the next batch holds them all (up to ``max_batch_size``).
        An idle replica admits at once, so a lone request waits no longer than before. (Serve waited for the
        running batch before ray-project/ray#53096 made batches concurrent; drop this gate if it does again.)"""
        await self._model_free.wait()

    async def _run(self, name: str, function, items: list) -> list:
        """Run ``function(items)`` on the model thread (so the event loop keeps queueing), recording the size."""
        self._batch_sizes[name][len(items)] += 1
        self._batch_size_metric.observe(len(items), tags={"method": name})

        def run() -> list:
            self._batch_started = time.monotonic()
            try:
                with torch.inference_mode():  # grad mode is per thread
                    return function(items)
            finally:
                self._batch_started = None

        self._running += 1
        self._model_free.clear()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._model_thread, run)
        finally:
            self._running -= 1
            if not self._running:
                self._model_free.set()

    def check_health(self) -> None:
        """Serve's periodic health check: raises once the running batch has run for over twice
        ``model_timeout_s``, so that Serve replaces this replica."""
        started = self._batch_started
        if started is not None and time.monotonic() - started > self._hung_after_s:
            raise RuntimeError(
                f"a batch has run on the model thread for {time.monotonic() - started:.0f} s, over twice "
                f"model_timeout_s ({self._hung_after_s:.0f} s): the model thread is stuck"
            )

    def stats(self) -> dict[str, dict[str, Any]]:
        """``settings`` (max_batch_size, batch_wait_timeout_s) and, per batched method, ``batches``, ``requests``,
        the largest batch seen (``max_batch_size``) and ``sizes`` {size: count}."""
        methods = {
            name.strip("_").removesuffix("_batch"): {
                "batches": sum(sizes.values()),
                "requests": sum(size * count for size, count in sizes.items()),
                "max_batch_size": max(sizes, default=0),
                "sizes": dict(sorted(sizes.items())),
            }
            for name, sizes in self._batch_sizes.items()
        }
        return {"settings": dict(self._batch_settings), **methods}
