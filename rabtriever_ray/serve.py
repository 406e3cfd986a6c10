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

Every model method is dynamically batched (``@serve.batch``): concurrent requests are queued and run as one model
call of up to ``max_batch_size`` requests, after waiting at most ``batch_wait_timeout_s`` for the batch to fill.
The model runs in one worker thread per replica, so the event loop keeps accepting requests (and answering health
checks) while a batch runs. Requests that arrive meanwhile wait until it ends and then form the next batch together
(`_BatchedModel._admit`); Serve alone would already form it from the one or two requests that came within the
wait. ``reconfigure`` (Serve's ``user_config``) changes both settings live.

HTTP routes (an error is ``{"error": {"message", "type", "param", "code"}}``; ``param`` names the field):

- ``POST /v1/embeddings``: OpenAI-compatible (``input`` string or list, ``model`` "student",
  ``encoding_format`` float|base64); extension ``input_type`` query (default) | document. Returns first-stage
  vectors (L2-normalised ``q_proj`` / ``d_proj`` of the frozen embeddings) and ``truncated``: the inputs cut.
- ``GET /v1/models``: "student" and "teacher", with their backbone, checkpoint, vector size and index.
- ``POST /rerank``: ``{"query", "documents", "top_n", "model": "student"|"teacher", "return_documents"}`` ->
  ``{"model", "results": [{"index", "relevance_score", "document"?}], "truncated": {"query", "documents"}}``,
  best first (Cohere / Jina style).
- ``POST /search``: ``{"query", "top_k" (10), "rerank": "none"|"student" (default)|"teacher"}`` ->
  ``{"results": [{"doc_id", "score", "text"}], "truncated": {"query", "documents"}}``; 409 without an index.
  ``teacher`` re-scores the student's top_k on the Reranker (as `Searcher` with ``rerank="teacher"`` does).
- ``GET /healthz``: 200 once both models are loaded, 503 before (other routes answer 503 until then too).

Scores: ``relevance_score`` and ``student`` / ``teacher`` search scores are ``logp_yes - logp_no`` of the
teacher's answer (the student predicts it; higher = more relevant); ``rerank="none"`` search scores are
first-stage cosines. Texts longer than the prompt's token limits are cut (documents at the end, queries at the
start) and listed in ``truncated``; a text over ``max_text_bytes`` or a body over ``max_request_bytes`` is 413.

Auth: when ``RABTRIEVER_API_KEY`` is set where the app is built (``serve run``, or the cluster's environment for
``serve deploy``), every route but ``/healthz`` needs ``Authorization: Bearer <key>`` (401 otherwise). Only the
key's SHA-256 is passed to the Router, which compares digests in constant time.

Metrics (Prometheus, through Ray's metrics agent): ``ray_rabtriever_requests_total{route,status}``,
``ray_rabtriever_request_latency_ms{route}``, ``ray_rabtriever_batch_size{method}``, beside Serve's own.

Defaults: ``app`` is what ``serve run rabtriever_ray.serve:app`` runs: ``build_app({})``, made when asked for, not
at import. Building it is cheap (it resolves paths and binds deployments); the models load in the replicas.
Without ``checkpoint``, the app serves the demo: its checkpoint and index live under ``cache_dir()/serve-demo``;
the first replica to start builds them (the demo distillation, `run_distill` on the bundled data, then
`build_index`; about 8 minutes on 2 CPUs) under a file lock, the others wait, and later starts reuse them.
``build_app`` logs which of the two will happen.
"""

# No ``from __future__ import annotations``: the Router's class is pickled by value onto its replica, and FastAPI
# reads the route signatures' types there, so they must be objects, not strings.
import asyncio
import base64
import collections
import hashlib
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, Field, StrictStr, field_validator
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from .config import ConfigError, ServeConfig, ServeResources, TeacherConfig, load_config
from .models import cache_dir

# Serve routes the "ray.serve" logger of a replica to its log file and the driver's console.
logger = logging.getLogger("ray.serve")

API_KEY_ENV = "RABTRIEVER_API_KEY"
ROUTES = ("/v1/embeddings", "/v1/models", "/rerank", "/search", "/healthz")
# The demo distillation and index build run beside the deployments' reservations (0.6 CPUs by default), so on a
# 2-CPU machine they get fractions too (Ray Data's own 1-CPU tasks need the rest); the work uses the free cores.
DEMO_RESOURCES = ["cpus_per_worker=0.4", "teacher_cpus=0.4"]
DEMO_INDEX_CPUS = 0.4
READY_STATUSES = ("HEALTHY", "UPSCALING", "DOWNSCALING")  # Serve deployment statuses with replicas serving
DEFAULT_TOP_K = 10


# --------------------------------------------------------------------------------------------------------------
# Configuration and the demo defaults.


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


def demo_paths(demo_distill: list[str]) -> tuple[Path, Path]:
    """(checkpoint, index) of the demo under `cache_dir` (one folder per set of distillation overrides)."""
    name = "serve-demo"
    if demo_distill:
        name += "-" + hashlib.sha256("\n".join(demo_distill).encode()).hexdigest()[:8]
    root = cache_dir() / name
    return root / "distill" / "checkpoint", root / "index"


def ensure_demo(demo_distill: list[str]) -> tuple[Path, Path]:
    """Build the demo checkpoint and index unless they exist (one process at a time); returns their paths."""
    import fcntl

    from .config import DistillConfig, IndexConfig
    from .data import DEMO_DATA
    from .index import build_index
    from .io import MANIFEST

    checkpoint, index = demo_paths(demo_distill)
    root = index.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (checkpoint / "student.safetensors").is_file():
            from .distill import run_distill

            logger.warning("building the demo checkpoint in %s (the demo distillation)", checkpoint.parent)
            overrides = [*DEMO_RESOURCES, *demo_distill, f"out_dir={checkpoint.parent}"]
            run_distill(load_config(DistillConfig, None, overrides))
        if not (index / MANIFEST).is_file():
            logger.warning("building the demo index in %s", index)
            build_index(
                IndexConfig(str(checkpoint), str(DEMO_DATA), str(index), cpus_per_actor=DEMO_INDEX_CPUS, overwrite=True)
            )
    return checkpoint, index


def _checkpoint_and_index(config: ServeConfig) -> tuple[Path, Path | None]:
    if config.checkpoint is None:
        return ensure_demo(config.demo_distill)
    return Path(config.checkpoint), Path(config.index) if config.index else None


def _teacher_config(config: ServeConfig, checkpoint: Path) -> TeacherConfig:
    """The Reranker's teacher: the checkpoint's, or ``config.teacher`` (a YAML, or a model spec with its prompt)."""
    import dataclasses

    from .student import load_student_info

    recorded = load_student_info(checkpoint)["teacher_config"]
    if config.teacher is None:
        return recorded
    if config.teacher.endswith((".yaml", ".yml")):
        return load_config(TeacherConfig, config.teacher)
    return dataclasses.replace(recorded, model=config.teacher)


# --------------------------------------------------------------------------------------------------------------
# Model deployments.


class _BatchedModel:
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
            with torch.inference_mode():  # grad mode is per thread
                return function(items)

        self._running += 1
        self._model_free.clear()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._model_thread, run)
        finally:
            self._running -= 1
            if not self._running:
                self._model_free.set()

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


@serve.deployment
class Encoder(_BatchedModel):
    """The student and, when configured, the index: first-stage vectors, predictor scores and search."""

    BATCHED = ("_embed_batch", "_rerank_batch", "_search_batch")

    def __init__(self, config: ServeConfig):
        from .search import Searcher
        from .student import load_student, load_student_info

        checkpoint, index = _checkpoint_and_index(config)
        teacher = load_student_info(checkpoint)["teacher_config"]
        self.student = load_student(checkpoint, teacher, config.device)
        self.searcher = Searcher.from_student(self.student, teacher, index, checkpoint) if index else None
        self.first_stage_k = config.first_stage_k
        # Documents the index holds are encoded already: /rerank reads their stored hidden states.
        texts = self.searcher.index.doc_text if self.searcher else []
        self._indexed = {text: row for row, text in enumerate(texts)}
        self._info = {
            "backbone": teacher.model,
            "checkpoint": str(checkpoint),
            "dimensions": self.student.config.proj_dim,
            "index": None if index is None else {"path": str(index), "count": len(self.searcher.index)},
        }
        self._start_batching(config)
        logger.info("Encoder ready: %s", self._info)

    def info(self) -> dict[str, Any]:
        return self._info

    @property
    def _prompts(self):
        return self.student.teacher.prompts

    # -- handle methods: one request each; batched across concurrent requests -------------------------------

    async def embed(self, texts: list[str], input_type: str) -> dict[str, Any]:
        """First-stage vectors ``[n][k]`` of queries or documents, with the tokens kept and the inputs cut."""
        await self._admit()
        return await self._embed_batch((tuple(texts), input_type))

    async def rerank(self, query: str, documents: list[str]) -> dict[str, Any]:
        """Predictor scores of ``query`` against each document (`Rabtriever.score_matrix`); a document whose text
        the index holds is read from the index (the hidden state `build_index` stored), not encoded again."""
        await self._admit()
        return await self._rerank_batch((query, tuple(documents)))

    async def search(self, query: str, top_k: int, rerank: str) -> dict[str, Any]:
        """The index's top ``top_k`` for ``query`` (``rerank`` none | student, as `Searcher.search`)."""
        if self.searcher is None:
            raise ValueError("no index is configured")
        await self._admit()
        return await self._search_batch((query, top_k, rerank))

    # -- batches --------------------------------------------------------------------------------------------

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _embed_batch(self, items: list[tuple]) -> list[dict[str, Any]]:
        return await self._run("_embed_batch", self._embed, items)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _rerank_batch(self, items: list[tuple]) -> list[dict[str, Any]]:
        return await self._run("_rerank_batch", self._rerank, items)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _search_batch(self, items: list[tuple]) -> list[dict[str, Any]]:
        return await self._run("_search_batch", self._search, items)

    # -- model work (on the model thread) -------------------------------------------------------------------
    # Truncation flags come from the prompt builder (it tokenises once more) so that encoding stays in student.py.

    def _embed(self, items: list[tuple]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in items]
        for kind in ("query", "document"):
            members = [i for i, (_, input_type) in enumerate(items) if input_type == kind]
            texts = [text for i in members for text in items[i][0]]
            if not texts:
                continue
            if kind == "query":
                prompts = self._prompts.query_prompts(texts)
                vectors = self.student.embed_queries(self.student.encode_queries(texts))
                tokens, cut = prompts.query_tokens, prompts.query_truncated
            else:
                prompts = self._prompts.document_prompts(texts)
                vectors = self.student.embed_documents(self.student.encode_documents(texts))
                tokens, cut = prompts.doc_tokens, prompts.doc_truncated
            vectors = vectors.float().cpu()
            start = 0
            for i in members:
                end = start + len(items[i][0])
                out[i] = {
                    "vectors": vectors[start:end].tolist(),
                    "tokens": sum(tokens[start:end]),
                    "truncated": cut[start:end],
                }
                start = end
        return out

    def _rerank(self, items: list[tuple]) -> list[dict[str, Any]]:
        # Requests often share documents (candidates from one corpus) and sometimes queries: encode each once,
        # and documents of the index not at all.
        queries = list(dict.fromkeys(query for query, _ in items))
        documents = list(dict.fromkeys(doc for _, docs in items for doc in docs))
        query_row = {query: i for i, query in enumerate(queries)}
        doc_row = {doc: i for i, doc in enumerate(documents)}
        h_query = self.student.encode_queries(queries)
        fresh = [doc for doc in documents if doc not in self._indexed]
        encoded = dict(zip(fresh, self.student.encode_documents(fresh).cpu())) if fresh else {}
        h_doc = torch.stack(
            [
                encoded[doc] if doc in encoded else self.searcher.index.doc_hidden[self._indexed[doc]]
                for doc in documents
            ]
        )
        query_cut = self._prompts.query_prompts(queries).query_truncated
        doc_cut = self._prompts.document_prompts(documents).doc_truncated
        out = []
        for query, docs in items:
            rows = [doc_row[doc] for doc in docs]
            scores = self.student.score_matrix(h_query[query_row[query]][None], h_doc[rows])[0]
            out.append(
                {
                    "scores": scores.tolist(),
                    "query_truncated": query_cut[query_row[query]],
                    "documents_truncated": [doc_cut[row] for row in rows],
                }
            )
        return out

    def _search(self, items: list[tuple]) -> list[dict[str, Any]]:
        groups: dict[tuple[int, str], list[int]] = collections.defaultdict(list)
        for i, (_, top_k, rerank) in enumerate(items):
            groups[(top_k, rerank)].append(i)
        hits: list[list] = [[] for _ in items]
        for (top_k, rerank), members in groups.items():
            ranked = self.searcher.search([items[i][0] for i in members], top_k, self.first_stage_k, rerank)
            for i, row in zip(members, ranked):
                hits[i] = row
        query_cut = self._prompts.query_prompts([query for query, _, _ in items]).query_truncated
        out = []
        for row, cut in zip(hits, query_cut):
            doc_cut = self._prompts.document_prompts([hit.text for hit in row]).doc_truncated if row else []
            out.append(
                {
                    "hits": [{"doc_id": hit.doc_id, "score": hit.score, "text": hit.text} for hit in row],
                    "query_truncated": cut,
                    "documents_truncated": doc_cut,
                }
            )
        return out


@serve.deployment
class Reranker(_BatchedModel):
    """The teacher: one LLM pass per (query, document) pair."""

    BATCHED = ("_rerank_batch",)

    def __init__(self, config: ServeConfig):
        from .teacher import GenerativeReranker

        checkpoint, _ = _checkpoint_and_index(config)
        teacher = _teacher_config(config, checkpoint)
        self.teacher = GenerativeReranker.from_config(teacher, device=config.device)
        self._info = {"backbone": teacher.model, "checkpoint": str(checkpoint)}
        self._start_batching(config)
        logger.info("Reranker ready: %s", self._info)

    def info(self) -> dict[str, Any]:
        return self._info

    async def rerank(self, query: str, documents: list[str]) -> dict[str, Any]:
        """Teacher scores of ``query`` with each document (`GenerativeReranker.score`)."""
        await self._admit()
        return await self._rerank_batch((query, tuple(documents)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _rerank_batch(self, items: list[tuple]) -> list[dict[str, Any]]:
        return await self._run("_rerank_batch", self._rerank, items)

    def _rerank(self, items: list[tuple]) -> list[dict[str, Any]]:
        queries = [query for query, docs in items for _ in docs]
        documents = [doc for _, docs in items for doc in docs]
        prompts = self.teacher.prompts.pair_prompts(queries, documents)  # the flags, per part of the pair
        scores = self.teacher.score(queries, documents).score.tolist()
        out, start = [], 0
        for _, docs in items:
            end = start + len(docs)
            out.append(
                {
                    "scores": scores[start:end],
                    "query_truncated": any(prompts.query_truncated[start:end]),
                    "documents_truncated": prompts.doc_truncated[start:end],
                }
            )
            start = end
        return out


# --------------------------------------------------------------------------------------------------------------
# HTTP: request models, errors, the router.


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


Text = Annotated[StrictStr, AfterValidator(_not_blank)]


class EmbeddingRequest(BaseModel):
    """OpenAI ``POST /v1/embeddings`` (``input_type`` is this server's extension)."""

    input: Annotated[list[Text], Field(min_length=1)]
    model: str = "student"
    encoding_format: Literal["float", "base64"] = "float"
    input_type: Literal["query", "document"] = "query"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _one_string_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class RerankRequest(BaseModel):
    """``POST /rerank`` (Cohere / Jina style); ``top_n`` defaults to every document."""

    query: Text
    documents: Annotated[list[Text], Field(min_length=1)]
    top_n: Annotated[int, Field(ge=1)] | None = None
    model: Literal["student", "teacher"] = "student"
    return_documents: bool = False


class SearchRequest(BaseModel):
    """``POST /search``; ``rerank``: none (first-stage cosine), student (predictor) or teacher (LLM)."""

    query: Text
    top_k: Annotated[int, Field(ge=1)] | None = None  # default: min(DEFAULT_TOP_K, max_top_k)
    rerank: Literal["none", "student", "teacher"] = "student"


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, the ``param`` (field) at fault and why."""

    def __init__(self, status: int, param: str | None, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.message, self.kind = status, param, message, kind


def _error(status: int, param: str | None, message: str, kind: str = "invalid_request_error", **headers):
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def _field(error: dict) -> str:
    """The field a validation error is about: ``("body", "documents", 3)`` -> ``"documents.3"``, else "body"."""
    if error["type"] == "json_invalid":
        return "body"  # its loc holds a character position
    loc = [str(part) for part in error["loc"]]
    return ".".join(loc[1:] if loc[:1] == ["body"] else loc) or "body"


def _check_text(text: str, param: str, limit: int) -> None:
    size = len(text.encode())
    if size > limit:
        raise RequestError(413, param, f"{param}: {size} bytes, more than max_text_bytes={limit}")


def _metric_route(path: str) -> str:
    return path if path in ROUTES else "other"


@serve.deployment
@serve.ingress()
class Router:
    """The HTTP ingress: validates requests and calls the Encoder and the Reranker through their handles."""

    def __init__(
        self,
        encoder: DeploymentHandle,
        reranker: DeploymentHandle,
        config: ServeConfig,
        api_key_sha256: str | None = None,
    ):
        self.encoder, self.reranker, self.config = encoder, reranker, config
        self._api_key_sha256 = api_key_sha256
        self._loaded = False
        self._requests = Counter(
            "rabtriever_requests",
            description="HTTP requests by route and status.",
            tag_keys=("route", "status"),
        )
        self._latency = Histogram(
            "rabtriever_request_latency_ms",
            description="HTTP request latency (ms) by route.",
            boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000],
            tag_keys=("route",),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        """The FastAPI app, built on the replica so that its middleware and routes see this router's settings."""
        return _http_api(self)

    # -- every request --------------------------------------------------------------------------------------

    async def guard(self, request: Request, call_next):
        """Auth, body size, metrics, and a JSON 500 (never a crashed replica) around every request."""
        started = time.perf_counter()
        path = request.scope["path"].removeprefix(request.scope.get("root_path", "")) or "/"
        try:
            response = await self._checked(request, path, call_next)
        except Exception:
            logger.exception("unhandled error on %s", path)
            response = _error(500, None, "internal error; the replica log has the traceback", "server_error")
        route = _metric_route(path)
        self._requests.inc(tags={"route": route, "status": str(response.status_code)})
        self._latency.observe((time.perf_counter() - started) * 1000, tags={"route": route})
        return response

    async def _checked(self, request: Request, path: str, call_next):
        if self._api_key_sha256 is not None and path != "/healthz":
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            digest = hashlib.sha256(key.strip().encode()).hexdigest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self._api_key_sha256):
                return _error(
                    401, "authorization", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    "authentication_error", **{"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
        if not self._loaded and path != "/healthz":
            # Until both models have loaded once (the demo may take minutes to build), answer at once.
            self._loaded = all((await self._models_ready()).values())
            if not self._loaded:
                return _error(
                    503,
                    None,
                    "the models are loading; /healthz says when",
                    "loading",
                    **{"Retry-After": "30"},
                )
        limit = self.config.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            return _error(400, "content-length", f"invalid Content-Length {length!r}")
        if (int(length) if length else len(await request.body())) > limit:
            return _error(413, "body", f"request body over max_request_bytes={limit}")
        return await call_next(request)

    # -- routes ---------------------------------------------------------------------------------------------

    async def embeddings(self, body: EmbeddingRequest) -> dict[str, Any]:
        """First-stage vectors of queries (default) or documents (``input_type``), OpenAI-style."""
        if body.model != "student":
            raise RequestError(422, "model", f"model: only 'student' serves embeddings, got {body.model!r}")
        self._check_count(body.input, "input")
        for i, text in enumerate(body.input):
            _check_text(text, f"input.{i}", self.config.max_text_bytes)
        if body.dimensions is not None:
            dimensions = (await self.encoder.info.remote())["dimensions"]
            if body.dimensions != dimensions:
                raise RequestError(
                    422, "dimensions", f"dimensions: the vectors have {dimensions}, not {body.dimensions}"
                )
        result = await self.encoder.embed.remote(body.input, body.input_type)
        data = []
        for i, vector in enumerate(result["vectors"]):
            if body.encoding_format == "base64":
                vector = base64.b64encode(np.asarray(vector, dtype=np.float32).tobytes()).decode()
            data.append({"object": "embedding", "index": i, "embedding": vector})
        return {
            "object": "list",
            "data": data,
            "model": "student",
            "usage": {"prompt_tokens": result["tokens"], "total_tokens": result["tokens"]},
            "truncated": [i for i, cut in enumerate(result["truncated"]) if cut],
        }

    async def models(self) -> dict[str, Any]:
        """The student and the teacher, with backbone, checkpoint, vector size and index."""
        encoder, reranker = await asyncio.gather(self.encoder.info.remote(), self.reranker.info.remote())
        student = {"id": "student", "object": "model", "created": 0, "owned_by": "rabtriever-ray", **encoder}
        teacher = {"id": "teacher", "object": "model", "created": 0, "owned_by": "rabtriever-ray", **reranker}
        return {"object": "list", "data": [student, teacher]}

    async def rerank(self, body: RerankRequest) -> dict[str, Any]:
        """The documents best first, scored by the student (predictor) or the teacher (LLM)."""
        self._check_count(body.documents, "documents")
        _check_text(body.query, "query", self.config.max_text_bytes)
        for i, text in enumerate(body.documents):
            _check_text(text, f"documents.{i}", self.config.max_text_bytes)
        if body.top_n is not None and body.top_n > self.config.max_documents:
            raise RequestError(422, "top_n", f"top_n: at most max_documents={self.config.max_documents}")
        handle = self.encoder if body.model == "student" else self.reranker
        result = await handle.rerank.remote(body.query, body.documents)
        order = sorted(range(len(body.documents)), key=lambda i: -result["scores"][i])
        results = []
        for i in order[: body.top_n]:
            hit = {"index": i, "relevance_score": result["scores"][i]}
            if body.return_documents:
                hit["document"] = {"text": body.documents[i]}
            results.append(hit)
        return {
            "model": body.model,
            "results": results,
            "truncated": {
                "query": result["query_truncated"],
                "documents": [i for i, cut in enumerate(result["documents_truncated"]) if cut],
            },
        }

    async def search(self, body: SearchRequest) -> dict[str, Any]:
        """The index's top_k for the query, best first (409 without an index)."""
        if self.config.checkpoint is not None and self.config.index is None:
            raise RequestError(
                409, None, "no index is configured: start the app with index=PATH (a jobs/index.py folder)",
                "no_index",
            )  # fmt: skip
        _check_text(body.query, "query", self.config.max_text_bytes)
        top_k = min(DEFAULT_TOP_K, self.config.max_top_k) if body.top_k is None else body.top_k
        if top_k > self.config.max_top_k:
            raise RequestError(422, "top_k", f"top_k: at most max_top_k={self.config.max_top_k}")
        found = await self.encoder.search.remote(
            body.query, top_k, "student" if body.rerank == "teacher" else body.rerank
        )
        hits, doc_cut = found["hits"], found["documents_truncated"]
        if body.rerank == "teacher" and hits:
            # The student's top_k, re-scored by the teacher on the Reranker (Searcher's rerank="teacher").
            scored = await self.reranker.rerank.remote(body.query, [hit["text"] for hit in hits])
            for hit, score in zip(hits, scored["scores"]):
                hit["score"] = score
            doc_cut = scored["documents_truncated"]
            order = sorted(range(len(hits)), key=lambda i: -hits[i]["score"])
            hits, doc_cut = [hits[i] for i in order], [doc_cut[i] for i in order]
        return {
            "query": body.query,
            "rerank": body.rerank,
            "results": hits,
            "truncated": {
                "query": found["query_truncated"],
                "documents": [hit["doc_id"] for hit, cut in zip(hits, doc_cut) if cut],
            },
        }

    async def healthz(self) -> JSONResponse:
        """200 once the Encoder and the Reranker are up, else 503."""
        ready = await self._models_ready()
        ok = all(ready.values())
        return JSONResponse({"status": "ok" if ok else "loading", **ready}, status_code=200 if ok else 503)

    async def _models_ready(self) -> dict[str, bool]:
        """Whether the Encoder's and the Reranker's replicas are up, from Serve's deployment status rather than a
        model call, which would queue behind full batches (a busy server is not an unhealthy one)."""
        status = await asyncio.to_thread(serve.status)
        app = status.applications.get(serve.get_replica_context().app_name)
        deployments = app.deployments if app is not None else {}
        return {
            name: getattr(deployments.get(handle.deployment_name), "status", None) in READY_STATUSES
            for name, handle in (("encoder", self.encoder), ("reranker", self.reranker))
        }

    def _check_count(self, texts: list[str], param: str) -> None:
        if len(texts) > self.config.max_documents:
            raise RequestError(
                422,
                param,
                f"{param}: {len(texts)} items, more than max_documents={self.config.max_documents}",
            )


def _http_api(router: Router) -> FastAPI:
    """The routes of ``router`` as a FastAPI app (request models validate; `Router` methods do the work)."""
    api = FastAPI(title="rabtriever-ray", description="Rabtriever student and teacher on Ray Serve")

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            # e.g. curl -d without -H: the body was never read as JSON, so every field would look missing.
            return _error(
                415,
                "Content-Type",
                f"Content-Type: expected application/json, got {content_type or 'none'!r} "
                "(with curl: -H 'Content-Type: application/json')",
            )
        problems = [(_field(e), e["msg"]) for e in error.errors()]
        return _error(422, problems[0][0], "; ".join(f"{param}: {msg}" for param, msg in problems))

    @api.exception_handler(RequestError)
    async def refused(_request: Request, error: RequestError) -> JSONResponse:
        return _error(error.status, error.param, error.message, error.kind)

    api.middleware("http")(router.guard)
    api.post("/v1/embeddings")(router.embeddings)
    api.get("/v1/models")(router.models)
    api.post("/rerank")(router.rerank)
    api.post("/search")(router.search)
    api.get("/healthz")(router.healthz)
    return api


# --------------------------------------------------------------------------------------------------------------
# The application.


def _options(resources: ServeResources, max_batch_size: int = 1) -> dict[str, Any]:
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
                "(the demo distillation, about 8 minutes on 2 CPUs); /healthz answers 503 until then",
                checkpoint,
                index,
            )
    elif config.index is None:
        logger.info("no index given: /search answers 409")
    key = os.environ.get(API_KEY_ENV)
    key_sha256 = hashlib.sha256(key.encode()).hexdigest() if key else None
    encoder = Encoder.options(**_options(config.encoder, config.max_batch_size)).bind(config)
    reranker = Reranker.options(**_options(config.reranker, config.max_batch_size)).bind(config)
    return Router.options(**_options(config.router)).bind(encoder, reranker, config, key_sha256)


def __getattr__(name: str) -> Application:
    """``app`` is `build_app({})`, built when asked for (``serve run rabtriever_ray.serve:app`` does), not at import:
    every replica imports this module, and building logs what the defaults will do."""
    if name == "app":
        return build_app({})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
