"""The Serve app's config (`rabtriever_ray.serve`): which checkpoint, index and teacher, limits, auth, resources.

Loaded as the builder's args (`serve.application.load_serve_config`) the way job configs load (`loading`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .base import ConfigError, check_at_least, option

MAX_DOCUMENTS_LIMIT = 10_000  # the largest max_documents: list fields are bounded before their items are read


@dataclass
class ServeResources:
    """One Serve deployment's replicas and resources; ``max_replicas > min_replicas`` turns on autoscaling."""

    num_cpus: float = option(
        0.25,
        "CPUs reserved per replica; Ray sets OMP_NUM_THREADS (torch's threads) to max(1, floor(num_cpus))",
    )
    num_gpus: float = option(0.0, "GPUs per replica (a fraction shares one GPU between deployments)")
    min_replicas: int = option(1, "replicas (the lower bound when autoscaling)")
    max_replicas: int = option(
        1, "upper bound of replicas; above min_replicas, Serve autoscales between them"
    )
    target_ongoing_requests: float = option(
        8.0, "autoscaling target of requests in flight per replica (queued for a batch or running)"
    )
    max_ongoing_requests: int = option(
        64, "requests one replica accepts at once; at least max_batch_size, or batches never fill"
    )

    def __post_init__(self) -> None:
        check_at_least(self, 0, "num_cpus", "num_gpus")
        check_at_least(self, 1, "min_replicas", "max_ongoing_requests")
        if self.max_replicas < self.min_replicas:
            raise ConfigError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        if self.target_ongoing_requests <= 0:
            raise ConfigError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")


@dataclass
class RouterResources(ServeResources):
    """The HTTP ingress: light on CPU, many requests in flight (class defaults, as nested configs are rebuilt)."""

    num_cpus: float = option(0.1, "CPUs reserved per replica")
    max_ongoing_requests: int = option(256, "requests one replica accepts at once")


@dataclass
class ServeConfig:
    """The Serve application: which checkpoint, index and teacher, batching, request limits and resources."""

    checkpoint: str | None = option(
        None, "student checkpoint folder (jobs/distill.py's out_dir/checkpoint); None: the demo, built once"
    )
    index: str | None = option(
        None, "index folder from jobs/index.py; None: the demo index without a checkpoint, else no /search"
    )
    teacher: str | None = option(
        None, "the Reranker's model: a model spec or a teacher YAML; None: the checkpoint's model and prompt"
    )
    demo_distill: list[str] = option(
        [], "key=value overrides of the demo distillation (DistillConfig) run when no checkpoint is given"
    )
    device: str | None = option(None, "torch device of the models; None: CUDA when the replica has a GPU")
    max_batch_size: int = option(16, "requests per model call (dynamic batching; 1 turns it off)")
    batch_wait_timeout_s: float = option(0.01, "longest wait for a batch to fill once a request is queued")
    max_documents: int = option(100, "documents per /rerank request and inputs per /v1/embeddings request")
    max_text_bytes: int = option(32768, "UTF-8 bytes of one query, document or input (longer: 413)")
    max_request_bytes: int = option(
        4 * 2**20, "bytes of one request body (larger: 413, counted as they arrive for a chunked upload)"
    )
    max_top_k: int = option(100, "largest top_k of /search")
    first_stage_k: int = option(
        100, "FAISS candidates the predictor rescores per /search query (large indexes)"
    )
    auth: Literal["auto", "key", "none"] = option(
        "auto",
        "key: refuse to start without RABTRIEVER_API_KEY; none: every route open; auto: the key when set, else "
        "open with a warning",
    )
    doc_states: Literal["float16", "float32"] = option(
        "float16",
        "dtype the Encoder holds the index's hidden states in (half the memory of float32; scored in float32)",
    )
    quantize: Literal["none", "int8"] = option(
        "none",
        "int8: the Encoder's query encodings and the Reranker's pair scores run int8 decoder blocks on CPU, "
        "checked against fp32 when a replica starts (info and /healthz show the figures)",
    )
    quantize_check: Literal["refuse", "warn"] = option(
        "refuse", "what a replica whose int8 scores disagree with fp32 on the calibration sample does"
    )
    replica_retry_wait_s: float = option(
        5.0,
        "after a model replica dies during a call, how long the Router's one retry waits for a live replica "
        "(then 503 model_restarted)",
    )
    model_timeout_s: float = option(
        120.0,
        "deadline of one model call as the Router waits for it (then 504 model_timeout); a replica whose batch "
        "runs over twice this fails Serve's health check and is replaced",
    )
    body_timeout_s: float = option(
        30.0, "time to receive a request body once its headers arrived (slower: 408 body_timeout)"
    )
    encoder: ServeResources = option(ServeResources(), "the Encoder deployment (student and index)")
    reranker: ServeResources = option(ServeResources(), "the Reranker deployment (teacher)")
    router: RouterResources = option(RouterResources(), "the Router deployment (HTTP ingress)")

    def __post_init__(self) -> None:
        check_at_least(self, 1, "max_batch_size", "max_documents", "max_text_bytes", "max_request_bytes")
        if self.max_documents > MAX_DOCUMENTS_LIMIT:
            raise ConfigError(f"max_documents must be at most {MAX_DOCUMENTS_LIMIT}, got {self.max_documents}")
        check_at_least(self, 1, "max_top_k", "first_stage_k")
        check_at_least(self, 0, "batch_wait_timeout_s", "replica_retry_wait_s")
        for name in ("model_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
