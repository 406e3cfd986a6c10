"""The HTTP contract of the Serve app: request models, error bodies, the checks the `Router` applies and its routes
(`http_api`).

HTTP routes (an error is ``{"error": {"message", "type", "param", "code"}}``; ``param`` names the field):

- ``POST /v1/embeddings``: OpenAI-compatible (``input`` string or list, ``model`` "student",
  ``encoding_format`` float|base64); extension ``input_type`` query (default) | document. Returns first-stage
  vectors (L2-normalised ``q_proj`` / ``d_proj`` of the frozen embeddings) and ``truncated``: the inputs cut.
- ``GET /v1/models``: "student" and "teacher", with their backbone, checkpoint, vector size and index.
- ``POST /rerank``, ``POST /v1/rerank`` and ``POST /v2/rerank`` (one route; the Cohere v2 / Jina dialect, docs/serving.md):
  ``{"query", "documents": [str | {"text"}], "top_n", "model": "student"|"teacher", "return_documents",
  "max_tokens_per_doc"}`` -> ``{"id", "model", "results": [{"index", "relevance_score", "document"?: {"text"}}],
  "meta": {"api_version", "billed_units", "tokens"}, "usage": {"prompt_tokens", "total_tokens"},
  "truncated": {"query", "documents"}}``, best first.
- ``POST /search``: ``{"query", "top_k" (10), "rerank": "none"|"student" (default)|"teacher"}`` ->
  ``{"results": [{"doc_id", "score", "text"}], "truncated": {"query", "documents"}}``; 409 without an index.
  ``teacher`` re-scores the student's top_k on the Reranker (as `Searcher` with ``rerank="teacher"`` does).
- ``GET /healthz``: 200 once both models are loaded, 503 before (other routes answer 503 until then too).

Scores: ``relevance_score`` and ``student`` / ``teacher`` search scores are the teacher's answer score by its
prompt preset's rule (``logp_yes - logp_no`` by default, raw ``logit(Yes)`` for bge-reranker-gemma; the student
predicts it; higher = more relevant); ``rerank="none"`` search scores are
first-stage cosines. Texts longer than the prompt's token limits are cut (documents at the end, queries at the
start) and listed in ``truncated``; a text over ``max_text_bytes`` or a body over ``max_request_bytes`` is 413.
A model replica that dies during a call is retried once on another; when none takes the retry in time the answer
is 503 ``model_restarted`` with ``Retry-After``.
"""

# No ``from __future__ import annotations``: these models are the types of the Router's route signatures, which
# FastAPI reads on the replica.
import contextlib
import hashlib
import ipaddress
import json
import math
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    TypeAdapter,
    WrapValidator,
    field_validator,
)

from ..config.base import ConfigError
from ..config.serving import MAX_DOCUMENTS_LIMIT

API_KEY_ENV = "RABTRIEVER_API_KEY"
ROUTES = ("/v1/embeddings", "/v1/models", "/rerank", "/v1/rerank", "/v2/rerank", "/search", "/healthz")
RERANK_MODELS = ("student", "teacher")
DEFAULT_TOP_K = 10
# The most items any list field may hold, checked before its items are (a list of two million bad items would
# otherwise cost two million validation errors); `ServeConfig.max_documents` is at most this.
MAX_LIST_ITEMS = MAX_DOCUMENTS_LIMIT
MAX_REPORTED_ERRORS = 5  # validation errors named in one 422 message


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate from a JSON "\ud83d" escape
        raise ValueError(f"not valid Unicode: a lone surrogate at character {err.start}") from None
    return text


Text = Annotated[StrictStr, AfterValidator(_text)]


class EmbeddingRequest(BaseModel):
    """OpenAI ``POST /v1/embeddings`` (``input_type`` is this server's extension)."""

    input: Annotated[list[Text], Field(min_length=1, max_length=MAX_LIST_ITEMS)]
    model: str = "student"
    encoding_format: Literal["float", "base64"] = "float"
    input_type: Literal["query", "document"] = "query"
    dimensions: int | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _one_string_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class TextDocument(BaseModel):
    """A document as an object (Cohere v1, Jina): ``{"text": ...}``; other keys are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")
    text: Text


_TEXT = TypeAdapter(Text)


def _string_or_object(value: Any, _handler) -> str | TextDocument:
    # Validated by hand rather than as a union, so that an error names ``documents.3`` or ``documents.3.text``
    # (a union would add the member's name to the field).
    return TextDocument.model_validate(value) if isinstance(value, dict) else _TEXT.validate_python(value)


Document = Annotated[TextDocument | Text, WrapValidator(_string_or_object)]


class RerankRequest(BaseModel):
    """``POST /rerank`` = ``POST /v2/rerank`` (Cohere v2 / Jina); ``top_n`` defaults to every document.

    Other fields those APIs define (``rank_fields``, ``max_chunks_per_doc``, ...) are ignored."""

    query: Text
    documents: Annotated[list[Document], Field(min_length=1, max_length=MAX_LIST_ITEMS)]
    top_n: Annotated[int, Field(ge=1)] | None = None
    # Only this server's names: another service's model name (rerank-v3.5, jina-reranker-...) is refused
    # rather than quietly served by a model it is not (docs/serving.md, "model").
    model: Literal[RERANK_MODELS] = "student"
    return_documents: bool = False
    max_tokens_per_doc: Annotated[int, Field(ge=1)] | None = None

    @property
    def texts(self) -> list[str]:
        return [doc if isinstance(doc, str) else doc.text for doc in self.documents]

    def document_param(self, index: int) -> str:
        """The field of document ``index``'s text: ``documents.3`` or ``documents.3.text``."""
        return f"documents.{index}" + ("" if isinstance(self.documents[index], str) else ".text")


class SearchRequest(BaseModel):
    """``POST /search``; ``rerank``: none (first-stage cosine), student (predictor) or teacher (LLM)."""

    query: Text
    top_k: Annotated[int, Field(ge=1)] | None = None  # default: min(DEFAULT_TOP_K, max_top_k)
    rerank: Literal["none", "student", "teacher"] = "student"


class RequestError(Exception):
    """A request the server refuses: HTTP ``status``, the ``param`` (field) at fault, why, and response headers."""

    def __init__(
        self,
        status: int,
        param: str | None,
        message: str,
        kind: str = "invalid_request_error",
        **headers: str,
    ):
        super().__init__(message)
        self.status, self.param, self.message, self.kind = status, param, message, kind
        self.headers = headers


def error_response(
    status: int, param: str | None, message: str, kind: str = "invalid_request_error", **headers: str
) -> JSONResponse:
    """The error body ``{"error": {"message", "type", "param", "code"}}`` with HTTP ``status`` and ``headers``."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers or None)


def error_param(error: dict) -> str:
    """The field a validation error is about: ``("body", "documents", 3)`` -> ``"documents.3"``, else "body"."""
    if error["type"] == "json_invalid":
        return "body"  # its loc holds a character position
    loc = [str(part) for part in error["loc"]]
    return ".".join(loc[1:] if loc[:1] == ["body"] else loc) or "body"


def check_finite(scores: list[float], model: str, items: str) -> None:
    """Raise a 500 `RequestError` when a model returned NaN or infinite scores (a broken checkpoint, a degenerate
    text): they would sort first and break the JSON answer, so nothing is ranked; the message names the items."""
    bad = [i for i, score in enumerate(scores) if not math.isfinite(score)]
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        raise RequestError(
            500,
            items,
            f"{model} scored {len(bad)} of {len(scores)} {items} as NaN or infinite ({items} {shown}): the "
            "checkpoint or the model is broken; nothing was ranked",
            kind="model_error",
        )


def check_text_size(text: str, param: str, limit: int) -> None:
    """Raise a 413 `RequestError` naming ``param`` when ``text`` is over ``limit`` bytes (UTF-8)."""
    size = len(text.encode())
    if size > limit:
        raise RequestError(413, param, f"{param}: {size} bytes, more than max_text_bytes={limit}")


def metric_route(path: str) -> str:
    """The ``route`` label of a request's metrics: its path when it is one of `ROUTES`, else "other"."""
    return path if path in ROUTES else "other"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def check_exposure(auth: str, api_key_sha256: str | None, host: str | None) -> None:
    """Refuse open routes on a non-loopback ``host`` (the HTTP proxies' bind address) unless ``auth`` is ``none``:
    ``auto`` without a key is for ``serve run`` on this machine. ``host`` None (unknown) passes."""
    if api_key_sha256 is None and auth == "auto" and host is not None and not _is_loopback(host):
        raise ConfigError(
            f"Serve's HTTP proxies bind {host!r}, reachable from other machines, and {API_KEY_ENV} is not set: "
            "set it to require 'Authorization: Bearer <key>', or pass auth=none to serve open on purpose "
            "(behind a gateway that authenticates)"
        )


def call_digest(deployment: str, method: str, args: tuple) -> str:
    """What identifies a model call: the deployment, the method and its arguments (texts, limits)."""
    text = json.dumps([deployment, method, args], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def killed_twice(deployment: str, memory_s: int, again: bool) -> RequestError:
    """The 500 ``replica_died`` of a request that killed two ``deployment`` replicas (refused for ``memory_s``)."""
    when = "killed two" if not again else "killed two replicas earlier and is refused for now; it killed two"
    return RequestError(
        500, None,
        f"this request {when} {deployment} replicas (each died while serving it), so it is not "
        f"retried; requests with the same content are refused for {memory_s} s. The replica logs may say "
        "why (out of memory on an input, say)", "replica_died",
    )  # fmt: skip


async def read_body(request: Request, limit: int) -> bool:
    """Read a body of unannounced size, counting its bytes as they arrive; False (the rest unread) past ``limit``.

    The body read is kept where Starlette's ``BaseHTTPMiddleware`` replays it to the route (``Request._body``, as
    ``Request.body`` leaves it)."""
    chunks, size = [], 0
    async with contextlib.aclosing(request.stream()) as stream:
        async for chunk in stream:
            size += len(chunk)
            if size > limit:
                return False
            chunks.append(chunk)
    request._body = b"".join(chunks)
    return True


def http_api(router) -> FastAPI:
    """The routes of ``router`` (a `router.Router`) as a FastAPI app: the request models validate, the Router's
    methods do the work."""
    api = FastAPI(title="rabtriever-ray", description="Rabtriever student and teacher on Ray Serve")

    @api.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        content_type = request.headers.get("content-type", "")
        media = content_type.split(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            # e.g. curl -d without -H: the body was never read as JSON, so every field would look missing.
            return error_response(
                415,
                "Content-Type",
                f"Content-Type: expected application/json, got {content_type or 'none'!r} "
                "(with curl: -H 'Content-Type: application/json')",
            )
        errors = error.errors()
        problems = [(error_param(e), e["msg"]) for e in errors[:MAX_REPORTED_ERRORS]]
        message = "; ".join(f"{param}: {msg}" for param, msg in problems)
        if len(errors) > MAX_REPORTED_ERRORS:
            message += f" (and {len(errors) - MAX_REPORTED_ERRORS} more errors)"
        return error_response(422, problems[0][0], message)

    @api.exception_handler(RequestError)
    async def refused(_request: Request, error: RequestError) -> JSONResponse:
        return error_response(error.status, error.param, error.message, error.kind, **error.headers)

    api.middleware("http")(router.guard)
    api.post("/v1/embeddings")(router.embeddings)
    api.get("/v1/models")(router.models)
    api.post("/rerank")(router.rerank)
    api.post("/v2/rerank")(router.rerank)  # Cohere v2's path, for clients that append it to a base URL
    api.post("/v1/rerank")(router.rerank)  # Jina's (and Cohere v1's) path
    api.post("/search")(router.search)
    api.get("/healthz")(router.healthz)
    return api
