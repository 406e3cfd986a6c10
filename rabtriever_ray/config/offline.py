"""The configs of the offline jobs around distillation: scoring pairs with the teacher, indexing a corpus,
evaluating on a BEIR split. Keys in ``REQUIRED`` have no usable default."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..specs import CANDIDATES, parse_spec
from .base import ConfigError, actor_range, option
from .sections import TeacherConfig

_TEACHER_HELP = "the teacher: a section, a teacher YAML (configs/teacher/*.yaml) or a model spec"


@dataclass
class ScoreTeacherConfig:
    """Scoring candidate pairs with the teacher on Ray Data (jobs/score_teacher.py; `teacher_scores.write_teacher_scores`)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("data", "out")

    data: str = option("", "BEIR folder (corpus.jsonl, queries.jsonl, qrels/); required")
    split: str | None = option(None, "qrels split; its queries are scored (None: all queries)")
    out: str = option("", "output folder (written atomically); required")
    teacher: TeacherConfig = option(TeacherConfig(), _TEACHER_HELP)
    candidates: str = option("all", "all | bm25:K | random:K | path to a TREC run file")
    training: bool = option(
        False,
        "training pairs: add qrel positives missing from the candidates, and keep each query's candidate list whole "
        "in one written block",
    )
    max_queries: int | None = option(None, "seeded subset of this many queries")
    seed: int = option(0, "seed of the query subset and of random:K candidates")
    actors: str = option("1:1", "teacher actor pool MIN:MAX (or N)")
    gpus_per_actor: float | None = option(None, "GPUs per teacher actor; None: 1 when the cluster has GPUs")
    cpus_per_actor: float = option(1.0, "CPUs per teacher actor")
    batch_size: int = option(64, "rows per actor call (with training: about, whole candidate lists per call)")
    on_bad_row: Literal["fail", "skip"] = option("fail", "bad input rows: stop or skip (rejects.jsonl)")
    overwrite: bool = option(False, "replace a finished out")

    def __post_init__(self) -> None:
        actor_range(self.actors)
        self.candidates_spec = parse_spec(self.candidates, "candidates", CANDIDATES, ConfigError)


@dataclass
class IndexConfig:
    """Encoding a corpus with a checkpoint's student and building a FAISS index (jobs/index.py; `index.build_index`)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("checkpoint", "data", "out")

    checkpoint: str = option("", "distillation checkpoint folder (student.safetensors); required")
    data: str = option("", "BEIR folder; its corpus is indexed; required")
    out: str = option("", "index folder (written atomically); required")
    index_type: Literal["flat", "hnsw", "ivf"] = option("flat", "FAISS index over the first-stage vectors")
    hnsw_m: int = option(32, "HNSW neighbours per node")
    nlist: int | None = option(None, "IVF lists (None: 4 sqrt(n))")
    teacher: TeacherConfig | None = option(
        None, "backbone and prompt for a checkpoint that records none (a teacher YAML or a model spec)"
    )
    actors: str = option("1:1", "encoder actor pool MIN:MAX (or N)")
    gpus_per_actor: float | None = option(None, "GPUs per encoder actor; None: 1 when the cluster has GPUs")
    cpus_per_actor: float = option(1.0, "CPUs per encoder actor")
    batch_size: int = option(256, "documents per actor call")
    on_bad_row: Literal["fail", "skip"] = option("fail", "bad corpus rows: stop or skip")
    overwrite: bool = option(False, "replace a finished out")

    def __post_init__(self) -> None:
        actor_range(self.actors)


@dataclass
class EvaluateConfig:
    """Evaluating baselines, the teacher and Rabtriever on a BEIR split (jobs/evaluate.py; `evaluate.run_evaluation`)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("data", "split")

    data: str = option("", "BEIR folder (corpus.jsonl, queries.jsonl, qrels/); required")
    split: str = option("", "qrels split to evaluate (e.g. dev, test); required")
    methods: list[str] = option(
        ["bm25", "llm-embed", "teacher"],
        "comma-separated: frequency, bm25, minilm, minilm-ft, llm-embed, teacher, rabtriever, rabtriever-search",
    )
    out: str | None = option(None, "results JSON (written atomically)")
    checkpoint: str | None = option(None, "distillation checkpoint (rabtriever methods)")
    index: str | None = option(None, "jobs/index.py output for rabtriever-search")
    teacher: TeacherConfig = option(
        TeacherConfig(), _TEACHER_HELP + "; the student uses the prompt its checkpoint records"
    )
    max_queries: int | None = option(None, "seeded subset of this many queries")
    seed: int = option(0, "seed of the query subsets, random:K candidates and minilm-ft's fine-tuning")
    candidates: str = option("all", "candidates of the rerankers: all | bm25:K | random:K | TREC run file")
    train_data: str | None = option(None, "BEIR folder of the training split (None: data)")
    train_split: str = option("train", "qrels split of the training queries (frequency prior, minilm-ft)")
    max_train_queries: int | None = option(None, "seeded subset of the training queries minilm-ft trains on")
    exclude_self: bool = option(False, "drop a query's own id from its results")

    def __post_init__(self) -> None:
        self.candidates_spec = parse_spec(self.candidates, "candidates", CANDIDATES, ConfigError)
