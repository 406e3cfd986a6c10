"""The HTTP ingress: ``Router`` validates requests (the contract is in `http`) and calls the Encoder and the
Reranker through their handles.

Auth: when ``RABTRIEVER_API_KEY`` is set where the app is built (``serve run``, or the cluster's environment for
``serve deploy``), every route but ``/healthz`` needs ``Authorization: Bearer <key>`` (401 otherwise). Only the
key's SHA-256 is passed to the Router, which compares digests in constant time. ``ServeConfig.auth`` says whether
the key is required (`application.build_app` refuses to start ``auth=key`` without it, and warns that every route
is open under ``auto``, the default, without it). ``auto`` without a key serves only on a loopback address (as
``serve run`` does by default): a Router whose proxy binds any other address refuses to start unless
``auth=none`` says that open is meant.

Body size: ``max_request_bytes`` is checked against Content-Length before the body is read, and a chunked upload
(no Content-Length) is counted as its chunks arrive and answered 413 at the first byte past the limit, so a replica
never holds more than the limit of one body. (Serve's proxy queues what the client sends until the Router answers.)
A body must arrive within ``body_timeout_s`` of its headers (408 ``body_timeout`` otherwise).

Deadlines: a model call that has not answered within ``model_timeout_s`` is answered 504 ``model_timeout``; the
model replica's health check fails once one of its batches has run for twice that (`BatchedModel.check_health`),
and Serve replaces it. ``/healthz`` reads Serve's status at most once per `HEALTH_CACHE_S`, however often it is
called.

Replica deaths: the model calls are idempotent, so a call whose replica died (`_replica_gone`) is sent once more;
Serve's handle has marked the dead replica by then, so the retry goes to another one. The retry waits at most
``replica_retry_wait_s`` for a replica to take it (with a single replica, its replacement is still loading) and
then answers 503 ``model_restarted`` with ``Retry-After``, never a bare 500. A request whose retry's replica died
too has killed two replicas (a query of death: out of memory on its input, say): it is answered 500
``replica_died`` without ``Retry-After``, and the same request (the same model call) is refused at once for
`KILLER_MEMORY_S`, so a client that retries it anyway cannot take the replicas down one after another.

Metrics (Prometheus, through Ray's metrics agent): ``ray_rabtriever_requests_total{route,status}``,
``ray_rabtriever_request_latency_ms{route}``, ``ray_rabtriever_batch_size{method}``, beside Serve's own.
"""

# No ``from __future__ import annotations``: the Router's class is pickled by value onto its replica, and FastAPI
# reads the route signatures' types there, so they must be objects, not strings.
import asyncio
import base64
import collections
import contextlib
import hashlib
import hmac
import logging
import time
import uuid
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from ray.serve.metrics import Counter, Histogram

from .. import raycompat
from ..config import ServeConfig
from .http import (
    DEFAULT_TOP_K,
    EmbeddingRequest,
    RequestError,
    RerankRequest,
    SearchRequest,
    call_digest,
    check_exposure,
    check_finite,
    check_text_size,
    error_response,
    http_api,
    killed_twice,
    metric_route,
    read_body,
)

logger = logging.getLogger("ray.serve")

READY_STATUSES = ("HEALTHY", "UPSCALING", "DOWNSCALING")  # Serve deployment statuses with replicas serving
# What a handle call raises when its replica went away (Ray 2.60): ActorDiedError for a call in flight on a replica
# whose process died, ActorUnavailableError while it cannot be reached (both RayActorError); Serve's own errors
# when the chosen replica or the whole deployment is gone before the call is sent.
REPLICA_GONE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
RESTART_RETRY_AFTER_S = 10  # the Retry-After of a model_restarted 503: a replacement replica loads its model
KILLER_MEMORY_S = 600  # how long a model call that killed two replicas is refused at once
KILLERS_KEPT = 1000  # the most such calls remembered (the oldest forgotten first)
HEALTH_CACHE_S = 1.0  # /healthz and the loading check read Serve's status at most this often


def _replica_gone(error: BaseException) -> bool:
    """Whether ``error`` says the replica went away (also as the cause of a RayTaskError), not that the call failed."""
    return isinstance(error, REPLICA_GONE) or isinstance(getattr(error, "cause", None), REPLICA_GONE)


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
        check_exposure(config.auth, api_key_sha256, raycompat.serve_http_host())
        self._loaded = False
        # Digests of model calls that killed two replicas, with when: refused at once for KILLER_MEMORY_S.
        self._killers: collections.OrderedDict[str, float] = collections.OrderedDict()
        self._status_lock = asyncio.Lock()
        self._status: tuple[float, dict[str, bool]] | None = None  # (when read, readiness)
        logger.info(
            "Router: auth=%s, %s", config.auth, "API key required" if api_key_sha256 else "routes open"
        )
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
        return http_api(self)

    # -- every request --------------------------------------------------------------------------------------

    async def guard(self, request: Request, call_next):
        """Auth, body size, metrics, and a JSON 500 (never a crashed replica) around every request."""
        started = time.perf_counter()
        path = request.scope["path"].removeprefix(request.scope.get("root_path", "")) or "/"
        try:
            response = await self._checked(request, path, call_next)
        except Exception:
            logger.exception("unhandled error on %s", path)
            response = error_response(
                500, None, "internal error; the replica log has the traceback", "server_error"
            )
        route = metric_route(path)
        self._requests.inc(tags={"route": route, "status": str(response.status_code)})
        self._latency.observe((time.perf_counter() - started) * 1000, tags={"route": route})
        return response

    async def _checked(self, request: Request, path: str, call_next):
        if self._api_key_sha256 is not None and path != "/healthz":
            scheme, _, key = request.headers.get("authorization", "").partition(" ")
            digest = hashlib.sha256(key.strip().encode()).hexdigest()
            if scheme.lower() != "bearer" or not hmac.compare_digest(digest, self._api_key_sha256):
                return error_response(
                    401, "authorization", "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    "authentication_error", **{"WWW-Authenticate": "Bearer"},
                )  # fmt: skip
        if not self._loaded and path != "/healthz":
            # Until both models have loaded once (the demo may take minutes to build), answer at once.
            self._loaded = all((await self._models_ready()).values())
            if not self._loaded:
                return error_response(
                    503,
                    None,
                    "the models are loading; /healthz says when",
                    "loading",
                    **{"Retry-After": "30"},
                )
        limit = self.config.max_request_bytes
        length = request.headers.get("content-length")
        if length is not None and not length.isdigit():
            return error_response(400, "content-length", f"invalid Content-Length {length!r}")
        if length is not None and int(length) > limit:  # refused before a byte of the body is read
            return error_response(413, "body", f"request body over max_request_bytes={limit}")
        if length is not None or "transfer-encoding" in request.headers:
            # Read here, under a deadline: a client that sends its body slowly would otherwise hold the request.
            try:
                within = await asyncio.wait_for(read_body(request, limit), self.config.body_timeout_s)
            except asyncio.TimeoutError:
                return error_response(
                    408, "body", f"request body not received within body_timeout_s={self.config.body_timeout_s}",
                    "body_timeout",
                )  # fmt: skip
            if not within:  # chunked: counted as it arrives
                return error_response(413, "body", f"request body over max_request_bytes={limit}")
        return await call_next(request)

    async def _call(self, handle: DeploymentHandle, method: str, *args: Any) -> Any:
        """``await handle.<method>.remote(*args)`` within ``model_timeout_s`` (`RequestError` 504 ``model_timeout``
        after it), sent once more when its replica died (`_retried`)."""
        try:
            return await asyncio.wait_for(self._retried(handle, method, *args), self.config.model_timeout_s)
        except asyncio.TimeoutError:
            logger.warning("%s.%s: no answer within model_timeout_s", handle.deployment_name, method)
            raise RequestError(
                504, None,
                f"the {handle.deployment_name} model did not answer within model_timeout_s="
                f"{self.config.model_timeout_s}", "model_timeout",
            ) from None  # fmt: skip

    async def _retried(self, handle: DeploymentHandle, method: str, *args: Any) -> Any:
        """The call, sent once more when its replica died (`_replica_gone`).

        The retry waits at most ``replica_retry_wait_s`` for a replica to take it. Raises `RequestError` 503
        ``model_restarted`` when the retry finds no replica in time, and 500 ``replica_died`` when its replica dies
        too (the call is then remembered and refused at once for `KILLER_MEMORY_S`)."""
        digest = None
        if self._killers:
            digest = call_digest(handle.deployment_name, method, args)
            now = time.monotonic()
            while self._killers and next(iter(self._killers.values())) < now - KILLER_MEMORY_S:
                self._killers.popitem(last=False)
            if digest in self._killers:
                raise killed_twice(handle.deployment_name, KILLER_MEMORY_S, again=True)
        call = getattr(handle, method)
        try:
            return await call.remote(*args)
        except Exception as error:
            if not _replica_gone(error):
                raise
            logger.warning("%s.%s: %s; retrying once", handle.deployment_name, method, type(error).__name__)
        try:
            async with contextlib.AsyncExitStack() as stack:
                replica = await asyncio.wait_for(
                    stack.enter_async_context(call.choose_replica(*args)), self.config.replica_retry_wait_s
                )
                return await call.dispatch(replica, *args)
        except Exception as error:
            if isinstance(error, asyncio.TimeoutError):
                logger.warning("%s.%s: no replica took the retry in time", handle.deployment_name, method)
                raise RequestError(
                    503, None, f"the {handle.deployment_name} model restarted during the request; retry it",
                    "model_restarted", **{"Retry-After": str(RESTART_RETRY_AFTER_S)},
                ) from error  # fmt: skip
            if not _replica_gone(error):
                raise
            logger.error("%s.%s: the retry's replica died too; refusing this call", handle.deployment_name, method)
            self._killers[digest or call_digest(handle.deployment_name, method, args)] = time.monotonic()
            while len(self._killers) > KILLERS_KEPT:
                self._killers.popitem(last=False)
            raise killed_twice(handle.deployment_name, KILLER_MEMORY_S, again=False) from error

    # -- routes ---------------------------------------------------------------------------------------------

    async def embeddings(self, body: EmbeddingRequest) -> dict[str, Any]:
        """First-stage vectors of queries (default) or documents (``input_type``), OpenAI-style."""
        if body.model != "student":
            raise RequestError(422, "model", f"model: only 'student' serves embeddings, got {body.model!r}")
        self._check_count(body.input, "input")
        for i, text in enumerate(body.input):
            check_text_size(text, f"input.{i}", self.config.max_text_bytes)
        if body.dimensions is not None:
            dimensions = (await self._call(self.encoder, "info"))["dimensions"]
            if body.dimensions != dimensions:
                raise RequestError(
                    422, "dimensions", f"dimensions: the vectors have {dimensions}, not {body.dimensions}"
                )
        result = await self._call(self.encoder, "embed", body.input, body.input_type)
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
        encoder, reranker = await asyncio.gather(
            self._call(self.encoder, "info"), self._call(self.reranker, "info")
        )
        student = {"id": "student", "object": "model", "created": 0, "owned_by": "rabtriever-ray", **encoder}
        teacher = {"id": "teacher", "object": "model", "created": 0, "owned_by": "rabtriever-ray", **reranker}
        return {"object": "list", "data": [student, teacher]}

    async def rerank(self, body: RerankRequest) -> dict[str, Any]:
        """The documents best first, scored by the student (predictor) or the teacher (LLM): one response that
        is both a Cohere v2 and a Jina rerank response, plus ``model`` and ``truncated`` (docs/serving.md)."""
        texts = body.texts
        self._check_count(texts, "documents")
        check_text_size(body.query, "query", self.config.max_text_bytes)
        for i, text in enumerate(texts):
            check_text_size(text, body.document_param(i), self.config.max_text_bytes)
        if body.top_n is not None and body.top_n > self.config.max_documents:
            raise RequestError(422, "top_n", f"top_n: at most max_documents={self.config.max_documents}")
        handle = self.encoder if body.model == "student" else self.reranker
        result = await self._call(handle, "rerank", body.query, texts, body.max_tokens_per_doc)
        check_finite(result["scores"], f"the {body.model}", "documents")
        order = sorted(range(len(texts)), key=lambda i: -result["scores"][i])
        results = []
        for i in order[: body.top_n]:
            hit = {"index": i, "relevance_score": result["scores"][i]}
            if body.return_documents:
                hit["document"] = {"text": texts[i]}  # as sent, even where max_tokens_per_doc cut it
            results.append(hit)
        tokens = result["tokens"]
        return {
            "id": str(uuid.uuid4()),
            "model": body.model,
            "results": results,
            "meta": {  # Cohere v2; a search unit is one query with up to 100 documents, as Cohere counts them
                "api_version": {"version": "2", "is_experimental": False},
                "billed_units": {"search_units": -(-len(texts) // 100)},
                "tokens": {"input_tokens": tokens, "output_tokens": 0},
            },
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},  # Jina (and OpenAI-style servers)
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
        check_text_size(body.query, "query", self.config.max_text_bytes)
        top_k = min(DEFAULT_TOP_K, self.config.max_top_k) if body.top_k is None else body.top_k
        if top_k > self.config.max_top_k:
            raise RequestError(422, "top_k", f"top_k: at most max_top_k={self.config.max_top_k}")
        found = await self._call(
            self.encoder, "search", body.query, top_k, "student" if body.rerank == "teacher" else body.rerank
        )
        hits, doc_cut = found["hits"], found["documents_truncated"]
        check_finite([hit["score"] for hit in hits], "the student" if body.rerank != "none" else "the index", "hits")
        if body.rerank == "teacher" and hits:
            # The student's top_k, re-scored by the teacher on the Reranker (Searcher's rerank="teacher").
            scored = await self._call(self.reranker, "rerank", body.query, [hit["text"] for hit in hits])
            check_finite(scored["scores"], "the teacher", "hits")
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
        model call, which would queue behind full batches (a busy server is not an unhealthy one). Read from the
        controller at most once per `HEALTH_CACHE_S`: concurrent callers share one read."""
        async with self._status_lock:
            if self._status is not None and time.monotonic() - self._status[0] < HEALTH_CACHE_S:
                return self._status[1]
            status = await asyncio.to_thread(serve.status)
            app = status.applications.get(serve.get_replica_context().app_name)
            deployments = app.deployments if app is not None else {}
            ready = {
                name: getattr(deployments.get(handle.deployment_name), "status", None) in READY_STATUSES
                for name, handle in (("encoder", self.encoder), ("reranker", self.reranker))
            }
            self._status = (time.monotonic(), ready)
            return ready

    def _check_count(self, texts: list[str], param: str) -> None:
        if len(texts) > self.config.max_documents:
            raise RequestError(
                422,
                param,
                f"{param}: {len(texts)} items, more than max_documents={self.config.max_documents}",
            )
