"""The Serve application: `build_app` binds the deployments with their options from `ServeConfig`.

(Not ``app.py``: a submodule ``app`` would be the package's attribute ``app`` once imported, hiding the lazy
``rabtriever_ray.serve:app`` that ``serve run`` asks for.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any

from ray.serve import Application

from ..config import ConfigError, ServeConfig, ServeResources, load_config
from ..demo import demo_paths
from .deployments import Encoder, Reranker
from .http import API_KEY_ENV
from .router import Router

# Serve routes the "ray.serve" logger of a replica to its log file and the driver's console.
logger = logging.getLogger("ray.serve")


def load_serve_config(args: dict[str, Any]) -> ServeConfig:
    """`ServeConfig` from Serve builder args: ``serve run ... key=value`` strings (dotted keys for sections) or the
    typed, possibly nested values of a serve config YAML's ``args``."""
    overrides = []

    def flatten(mapping: dict[str, Any], prefix: str) -> None:
        for key, value in mapping.items():
            if isinstance(value, dict):
                flatten(value, f"{prefix}{key}.")
            else:
                overrides.append(f"{prefix}{key}={value if isinstance(value, str) else json.dumps(value)}")

    flatten(dict(args), "")
    return load_config(ServeConfig, None, overrides)


def deployment_options(resources: ServeResources, max_batch_size: int = 1) -> dict[str, Any]:
    """``Deployment.options`` for one deployment: its actor resources, and autoscaling between ``min_replicas``
    and ``max_replicas`` (a fixed ``num_replicas`` when they are equal)."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": resources.num_cpus, "num_gpus": resources.num_gpus},
        # A replica that accepts fewer requests than a batch holds never fills one.
        "max_ongoing_requests": max(resources.max_ongoing_requests, max_batch_size),
    }
    if resources.max_replicas > resources.min_replicas:
        options["autoscaling_config"] = {
            "min_replicas": resources.min_replicas,
            "max_replicas": resources.max_replicas,
            "target_ongoing_requests": resources.target_ongoing_requests,
        }
    else:
        options["num_replicas"] = resources.min_replicas
    return options


def _api_key_sha256(auth: str) -> str | None:
    """The SHA-256 of ``RABTRIEVER_API_KEY`` that the Router will require, or None for open routes, as ``auth``
    (`ServeConfig.auth`) says: ``key`` refuses to build without the variable, ``auto`` warns that every route is
    open without it, ``none`` opens them whether it is set or not."""
    key = os.environ.get(API_KEY_ENV) or None
    if auth == "none":
        logger.info("auth=none: every route is open%s", f" ({API_KEY_ENV} is ignored)" if key else "")
        return None
    if key is None and auth == "key":
        raise ConfigError(
            f"auth=key but {API_KEY_ENV} is not set where the app is built: set it in the environment of "
            "`serve run`, or of the cluster for `serve deploy` / KubeRay (a Secret); auth=none serves without a key"
        )
    if key is None:
        logger.warning(
            "%s is not set: every route is open to anyone who reaches the port; set it to require "
            "'Authorization: Bearer <key>', or pass auth=none to say that open is meant",
            API_KEY_ENV,
        )
        return None
    return hashlib.sha256(key.encode()).hexdigest()


def build_app(args: dict[str, Any]) -> Application:
    """The application from builder args (`ServeConfig` keys; see `load_serve_config`). Cheap: loads nothing."""
    config = load_serve_config(args)
    if config.checkpoint is None:
        if config.index is not None:
            raise ConfigError("index= needs checkpoint= (the checkpoint the index was built with)")
        checkpoint, index = demo_paths(config.demo_distill)
        if (checkpoint / "student.safetensors").is_file() and (index / "manifest.json").is_file():
            logger.info("no checkpoint given: serving the demo checkpoint %s and index %s", checkpoint, index)
        else:
            logger.warning(
                "no checkpoint given: the demo checkpoint %s and index %s will be built on first start "
                "(the demo distillation, about 12 minutes on 2 CPUs); /healthz answers 503 until then",
                checkpoint,
                index,
            )
    elif config.index is None:
        logger.info("no index given: /search answers 409")
    key_sha256 = _api_key_sha256(config.auth)
    encoder = Encoder.options(**deployment_options(config.encoder, config.max_batch_size)).bind(config)
    reranker = Reranker.options(**deployment_options(config.reranker, config.max_batch_size)).bind(config)
    return Router.options(**deployment_options(config.router)).bind(encoder, reranker, config, key_sha256)
