"""The model deployments: ``Encoder`` (the student and its index) and ``Reranker`` (the teacher).

- ``Encoder``: the student (`load_student`: frozen backbone, predictor, projections) and, when configured, a FAISS
  index from ``jobs/index.py`` (`Searcher.from_student`, which refuses an index built for another checkpoint).
  It embeds queries and documents (first-stage vectors), scores (query, documents) with the predictor and
  searches the index.
- ``Reranker``: the teacher (`GenerativeReranker`), by default the checkpoint's model and prompt.

Both batch their methods dynamically (`BatchedModel`). Without ``checkpoint``, each replica serves the demo
(`demo.ensure_demo`, which builds it on the first start).
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any

import torch
from ray import serve

from ..config import ServeConfig, TeacherConfig, load_config
from .batching import BatchedModel

logger = logging.getLogger("ray.serve")


def _checkpoint_and_index(config: ServeConfig) -> tuple[Path, Path | None]:
    if config.checkpoint is None:
        from ..demo import ensure_demo

        return ensure_demo(config.demo_distill)
    return Path(config.checkpoint), Path(config.index) if config.index else None


def _teacher_config(config: ServeConfig, checkpoint: Path) -> TeacherConfig:
    """The Reranker's teacher: the checkpoint's, or ``config.teacher`` (a YAML, or a model spec with its prompt)."""
    import dataclasses

    from ..student import load_student_info

    recorded = load_student_info(checkpoint)["teacher_config"]
    if config.teacher is None:
        teacher = recorded
    elif config.teacher.endswith((".yaml", ".yml")):
        teacher = load_config(TeacherConfig, config.teacher)
    else:
        teacher = dataclasses.replace(recorded, model=config.teacher)
    return teacher.at_precision_of(config)


def _cut_documents(prompts, items: list[tuple]) -> tuple[list[tuple], list[list[bool]]]:
    """Rerank items ``(query, documents, max_tokens_per_doc)`` as ``(query, documents cut)``, and the cut flags."""
    cut_items, flags = [], []
    for query, documents, max_tokens in items:
        texts, cut = prompts.cut_documents(documents, max_tokens)
        cut_items.append((query, tuple(texts)))
        flags.append(cut)
    return cut_items, flags


@serve.deployment
class Encoder(BatchedModel):
    """The student and, when configured, the index: first-stage vectors, predictor scores and search."""

    BATCHED = ("_embed_batch", "_rerank_batch", "_search_batch")

    def __init__(self, config: ServeConfig):
        from ..index import DocumentIndex
        from ..search import Searcher
        from ..student import load_student, load_student_info

        checkpoint, index = _checkpoint_and_index(config)
        teacher = load_student_info(checkpoint)["teacher_config"].at_precision_of(config)
        self.student = load_student(checkpoint, teacher, config.device)
        held = DocumentIndex.load(index, config.doc_states) if index else None  # doc_states: the memory held
        self.searcher = (
            None if held is None else Searcher.from_student(self.student, teacher, held, checkpoint)
        )
        self.first_stage_k = config.first_stage_k
        # Documents the index holds are encoded already: /rerank reads their stored hidden states.
        texts = self.searcher.index.doc_text if self.searcher else []
        self._indexed = {text: row for row, text in enumerate(texts)}
        # Names, not paths: /v1/models answers anyone who may call the API.
        self._info = {
            "backbone": Path(teacher.model).name,
            "checkpoint": Path(checkpoint).name,
            "dimensions": self.student.config.proj_dim,
            "index": None if index is None else {"name": Path(index).name, "count": len(self.searcher.index)},
            "precision": self.student.precision,
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

    async def rerank(
        self, query: str, documents: list[str], max_tokens_per_doc: int | None = None
    ) -> dict[str, Any]:
        """Predictor scores of ``query`` against each document (`Rabtriever.rerank`), each document first cut to
        ``max_tokens_per_doc`` tokens (`PromptBuilder.cut_documents`); a document whose (cut) text the index holds
        is read from the index (the hidden state `build_index` stored), not encoded again. Also returns the
        truncation flags and ``tokens``: the query's tokens plus every document's, as encoded."""
        await self._admit()
        return await self._rerank_batch((query, tuple(documents), max_tokens_per_doc))

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

    def _embed(self, items: list[tuple]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{} for _ in items]
        for kind in ("query", "document"):
            members = [i for i, (_, input_type) in enumerate(items) if input_type == kind]
            texts = [text for i in members for text in items[i][0]]
            if not texts:
                continue
            if kind == "query":
                prompts = self._prompts.query_prompts(texts)
                vectors = self.student.embed_queries(self.student.encode_queries(prompts))
                tokens, cut = prompts.query_tokens, prompts.query_truncated
            else:
                prompts = self._prompts.document_prompts(texts)
                vectors = self.student.embed_documents(self.student.encode_documents(prompts))
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
        items, request_cut = _cut_documents(self._prompts, items)
        # Requests often share documents (candidates from one corpus) and sometimes queries: encode each once,
        # and documents of the index not at all.
        queries = list(dict.fromkeys(query for query, _ in items))
        documents = list(dict.fromkeys(doc for _, docs in items for doc in docs))
        query_row = {query: i for i, query in enumerate(queries)}
        doc_row = {doc: i for i, doc in enumerate(documents)}
        # Each text is tokenised once per batch: the prompts give both the model's input and the bookkeeping.
        query_prompts = self._prompts.query_prompts(queries)
        doc_prompts = self._prompts.document_prompts(documents)
        h_query = self.student.encode_queries(query_prompts)
        fresh = [row for row, doc in enumerate(documents) if doc not in self._indexed]
        encoded = (
            dict(zip(fresh, self.student.encode_documents(doc_prompts.select(fresh)).cpu())) if fresh else {}
        )
        h_doc = torch.stack(
            [
                encoded[row] if row in encoded else self.searcher.index.doc_hidden[self._indexed[doc]].float()
                for row, doc in enumerate(documents)
            ]
        )
        rows = [[doc_row[doc] for doc in docs] for _, docs in items]
        scores = self.student.rerank(h_query[[query_row[query] for query, _ in items]], h_doc, rows)
        return [
            {
                "scores": item_scores.tolist(),
                "query_truncated": query_prompts.query_truncated[query_row[query]],
                "documents_truncated": [
                    cut or doc_prompts.doc_truncated[row] for cut, row in zip(item_cut, item_rows)
                ],
                "tokens": query_prompts.query_tokens[query_row[query]]
                + sum(doc_prompts.doc_tokens[row] for row in item_rows),
            }
            for (query, _), item_rows, item_scores, item_cut in zip(items, rows, scores, request_cut)
        ]

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
class Reranker(BatchedModel):
    """The teacher: one LLM pass per (query, document) pair."""

    BATCHED = ("_rerank_batch",)

    def __init__(self, config: ServeConfig):
        from ..teacher import GenerativeReranker

        checkpoint, _ = _checkpoint_and_index(config)
        teacher = _teacher_config(config, checkpoint)
        self.teacher = GenerativeReranker.from_config(teacher, device=config.device)
        self._info = {
            "backbone": Path(teacher.model).name,
            "checkpoint": Path(checkpoint).name,
            "precision": self.teacher.precision,
        }
        self._start_batching(config)
        logger.info("Reranker ready: %s", self._info)

    def info(self) -> dict[str, Any]:
        return self._info

    async def rerank(
        self, query: str, documents: list[str], max_tokens_per_doc: int | None = None
    ) -> dict[str, Any]:
        """Teacher scores of ``query`` with each document (`GenerativeReranker.rerank`; the Router's teacher
        re-rank of search hits too), each document first cut to ``max_tokens_per_doc`` tokens; with the
        truncation flags and ``tokens``: query plus document tokens summed over the pairs (one pass each)."""
        await self._admit()
        return await self._rerank_batch((query, tuple(documents), max_tokens_per_doc))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def _rerank_batch(self, items: list[tuple]) -> list[dict[str, Any]]:
        return await self._run("_rerank_batch", self._rerank, items)

    def _rerank(self, items: list[tuple]) -> list[dict[str, Any]]:
        items, request_cut = _cut_documents(self.teacher.prompts, items)
        results = self.teacher.rerank([query for query, _ in items], [docs for _, docs in items], details=True)
        out = []
        for result, item_cut in zip(results, request_cut):
            out.append(
                {
                    "scores": result.score.tolist(),
                    "query_truncated": bool(result.query_truncated.any()),
                    "documents_truncated": [a or b for a, b in zip(item_cut, result.doc_truncated.tolist())],
                    "tokens": int(result.query_tokens.sum() + result.doc_tokens.sum()),
                }
            )
        return out
