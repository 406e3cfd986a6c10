"""Two-stage search with a trained Rabtriever over an index from `jobs/index.py`.

Each query is encoded once by the frozen backbone. The first stage takes the top ``first_stage_k`` documents by
inner product of the first-stage vectors (FAISS); the predictor then scores those candidates (`Rabtriever.rerank`)
and the top ``top_k`` are returned. ``rerank="teacher"`` re-scores that final list with the generative reranker
(`GenerativeReranker.rerank`: the same frozen model, reading each document with the query); ``rerank="none"``
returns the first stage as is. A
corpus of at most ``exhaustive_max_docs`` documents skips FAISS: the predictor scores every document.

Scores: ``student`` and ``teacher`` are the teacher's score rule (`scoring.YesNoHead`; ``logp_yes - logp_no`` by
default; higher = relevant); ``none`` is the first-stage
cosine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from .config import TeacherConfig
from .index import DocumentIndex

Rerank = Literal["none", "student", "teacher"]


@dataclass
class SearchHit:
    doc_id: str
    score: float
    text: str


class Searcher:
    """A student loaded from ``checkpoint`` searching ``index`` (a folder or an in-memory `DocumentIndex`).

    Args:
        teacher: the backbone and prompt, for checkpoints that do not record them (default: the checkpoint's).
        exhaustive_max_docs: corpora up to this size are scored document by document, without FAISS.
        nprobe, ef_search: IVF lists probed and HNSW search breadth (defaults: FAISS's, and max(64, k)).
    """

    def __init__(
        self,
        checkpoint: str | Path,
        index: str | Path | DocumentIndex,
        teacher: TeacherConfig | None = None,
        device: str | torch.device | None = None,
        exhaustive_max_docs: int = 10_000,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ):
        from .student import load_student, load_student_info

        teacher = load_student_info(checkpoint, teacher)["teacher_config"]
        student = load_student(checkpoint, teacher, device)
        self._setup(student, teacher, index, checkpoint, exhaustive_max_docs, nprobe, ef_search)

    @classmethod
    def from_student(
        cls,
        student,
        teacher: TeacherConfig,
        index: str | Path | DocumentIndex,
        checkpoint: str | Path | None = None,
        exhaustive_max_docs: int = 10_000,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> Searcher:
        """A searcher around an already loaded student (``teacher``: its backbone and prompt)."""
        searcher = cls.__new__(cls)
        searcher._setup(student, teacher, index, checkpoint, exhaustive_max_docs, nprobe, ef_search)
        return searcher

    def _setup(self, student, teacher, index, checkpoint, exhaustive_max_docs, nprobe, ef_search) -> None:
        self.student, self.teacher_config = student, teacher
        self.index = index if isinstance(index, DocumentIndex) else DocumentIndex.load(index)
        self.index.check_compatible(student, teacher, checkpoint)
        self.exhaustive_max_docs = exhaustive_max_docs
        self.nprobe, self.ef_search = nprobe, ef_search

    @property
    def teacher(self):
        return self.student.teacher

    def search(
        self,
        queries: Sequence[str],
        top_k: int = 10,
        first_stage_k: int = 100,
        rerank: Rerank = "student",
    ) -> list[list[SearchHit]]:
        """The ``top_k`` hits per query, best first (fewer when the corpus is smaller)."""
        if rerank not in ("none", "student", "teacher"):
            raise ValueError(f"rerank must be 'none', 'student' or 'teacher', got {rerank!r}")
        if top_k < 1 or first_stage_k < 1:
            raise ValueError(f"top_k and first_stage_k must be >= 1, got {top_k} and {first_stage_k}")
        if not queries:
            return []
        with torch.no_grad():
            h_query = self.student.encode_queries(list(queries))
            if rerank == "none":
                ranked = self._first_stage(h_query, top_k)
            elif len(self.index) <= self.exhaustive_max_docs:
                ranked = self._exhaustive(h_query, top_k)
            else:
                ranked = self._two_stage(h_query, max(first_stage_k, top_k), top_k)
        if rerank == "teacher":
            ranked = self._teacher_rerank(queries, ranked)
        return [
            [SearchHit(self.index.doc_ids[j], s, self.index.doc_text[j]) for j, s in hits] for hits in ranked
        ]

    def _first_stage(self, h_query: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
        vectors = self.student.embed_queries(h_query).float().cpu().numpy()
        scores, ids = self.index.search(vectors, k, self.nprobe, self.ef_search)
        return [
            [(int(j), float(s)) for j, s in zip(row_ids, row) if j >= 0] for row_ids, row in zip(ids, scores)
        ]

    def _exhaustive(self, h_query: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
        scores = self.student.score_matrix(h_query, self.index.doc_hidden).cpu()
        top = torch.topk(scores, min(k, scores.shape[1]), dim=1)
        return [list(zip(ids.tolist(), vals.tolist())) for vals, ids in zip(top.values, top.indices)]

    def _two_stage(self, h_query: torch.Tensor, first_k: int, k: int) -> list[list[tuple[int, float]]]:
        ids = [[j for j, _ in candidates] for candidates in self._first_stage(h_query, first_k)]
        out = []
        for rows, scores in zip(ids, self.student.rerank(h_query, self.index.doc_hidden, ids)):
            order = torch.argsort(scores, descending=True)[:k].tolist()
            out.append([(rows[o], float(scores[o])) for o in order])
        return out

    def _teacher_rerank(
        self, queries: Sequence[str], ranked: list[list[tuple[int, float]]]
    ) -> list[list[tuple[int, float]]]:
        texts = [[self.index.doc_text[j] for j, _ in hits] for hits in ranked]
        scores = self.teacher.rerank(queries, texts)
        return [
            sorted(zip([j for j, _ in hits], row.tolist()), key=lambda hit: -hit[1])
            for hits, row in zip(ranked, scores)
        ]
