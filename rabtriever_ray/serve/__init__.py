"""Ray Serve: the student (``Encoder``) and the teacher (``Reranker``) behind one HTTP ``Router``.

    serve run rabtriever_ray.serve:app                                    # the demo, on embedded defaults
    serve run rabtriever_ray.serve:build_app checkpoint=runs/demo/checkpoint index=runs/demo_index
    serve deploy cluster/serve.yaml                                       # a running cluster

Deployments (resources, replicas and autoscaling from `ServeConfig`, assembled with ``.bind()`` in `build_app`):

- ``Encoder``: the student (`load_student`: frozen backbone, predictor, projections) and, when configured, a FAISS
  index from ``jobs/index.py`` (`Searcher.from_student`, which refuses an index built for another checkpoint).
  It embeds queries and documents (first-stage vectors), scores (query, documents) with the predictor and
  searches the index.
- ``Reranker``: the teacher (`GenerativeReranker`), by default the checkpoint's model and prompt.
- ``Router``: the HTTP ingress (FastAPI), calling the two through `DeploymentHandle`s.


The HTTP contract (routes, errors, scores, limits) is in `rabtriever_ray.serve.http`, auth and metrics in
`rabtriever_ray.serve.router`, dynamic batching in `rabtriever_ray.serve.batching`, and the demo in
`rabtriever_ray.demo`.

Defaults: ``app`` is what ``serve run rabtriever_ray.serve:app`` runs: ``build_app({})``, made when asked for, not
at import. Building it is cheap (it resolves paths and binds deployments); the models load in the replicas.
Without ``checkpoint``, the app serves the demo: its checkpoint and index live under ``cache_dir()/serve-demo``;
the first replica to start builds them (the demo distillation, `run_distill` on the bundled data with its
teacher fine-tuning, then `build_index`; about 12 minutes on 2 CPUs) under a file lock, the others wait, and
later starts reuse them.
``build_app`` logs which of the two will happen.
"""

from ray.serve import Application

from ..config import ServeConfig
from ..demo import demo_paths, ensure_demo
from .application import build_app, load_serve_config
from .deployments import Encoder, Reranker
from .http import API_KEY_ENV, ROUTES, EmbeddingRequest, RequestError, RerankRequest, SearchRequest
from .router import Router

__all__ = [
    "API_KEY_ENV",
    "ROUTES",
    "EmbeddingRequest",
    "Encoder",
    "RequestError",
    "RerankRequest",
    "Reranker",
    "Router",
    "SearchRequest",
    "ServeConfig",
    "build_app",
    "demo_paths",
    "ensure_demo",
    "load_serve_config",
]


def __getattr__(name: str) -> Application:
    """``app`` is `build_app({})`, built when asked for (``serve run rabtriever_ray.serve:app`` does), not at import:
    every replica imports this module, and building logs what the defaults will do."""
    if name == "app":
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
