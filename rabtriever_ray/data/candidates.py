"""Where a query's candidate documents come from: candidate references per spec.

A reference names a (query, document) pair and the document's rank for the query (`REF_SCHEMA`; rank 1 = best).
`pairs` joins references with the queries, the corpus and the qrels into candidate pairs. The specs
(`specs.parse_spec`):

- ``all``: every document for every query, ranked in corpus order (small corpora, e.g. the 8 ESConv strategies);
  refused when queries x documents exceeds `MAX_ALL_PAIRS`.
- ``bm25:K``: the top K documents per query by BM25 (bm25s over title + text), ranked by score.
- ``random:K``: K documents per query drawn uniformly without replacement (`random_hits`), in the order drawn.
- a TREC run (``qid Q0 docid rank score tag``, a file or a folder of shards): the documents it lists, by rank.
- ``student:K`` (round pools only): the previous round's student's first stage (`rounds.student_pool_references`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from .beir import BeirData, corpus_table
from .checks import read_checked
from .files import READ_SCHEMAS, input_files, run_files
from .rows import DataError
from .tasks import LocalTasks

REF_SCHEMA = READ_SCHEMAS["run"]  # query_id, doc_id, rank, and where each came from (_file, _line)

# The most pairs the ``all`` policy builds. Every pair carries its full document text in the driver and costs the
# teacher one forward, so queries x documents bounds both; a million pairs (about 1 GB of text at 1 kB a pair, hours
# of teacher time) is well past every task that means "all" (ESConv: 12,235 training queries x 8 strategies =
# 97,880 pairs; the demo: 150 x 30) and refuses a full-corpus retrieval set (SciFact test: 300 x 5,183).
MAX_ALL_PAIRS = 1_000_000


def references(query_ids, doc_ids, ranks) -> pa.Table:
    """`REF_SCHEMA` rows that name no file (a retrieval's own candidates, or qrel positives)."""
    n = len(query_ids)
    return pa.table(
        {
            "query_id": query_ids,
            "doc_id": doc_ids,
            "rank": ranks,
            "_file": pa.array([-1] * n, pa.int32()),
            "_line": pa.array([0] * n, pa.int64()),
        },
        schema=REF_SCHEMA,
    )


def ranked_references(query_ids: Sequence[str], hits: Sequence[Sequence[str]]) -> pa.Table:
    """References of each query's ranked documents (``hits[i]`` best first, for ``query_ids[i]``)."""
    return references(
        pa.array([q for q, row in zip(query_ids, hits) for _ in row], pa.string()),
        pa.array([d for row in hits for d in row], pa.string()),
        pa.array([float(r) for row in hits for r in range(1, len(row) + 1)], pa.float64()),
    )


def read_run(run, tasks=None, queries: list[Path] | None = None) -> tuple[object, int, list]:
    """A TREC run read and validated (a bad line is a `DataError` naming file, line and field): its `REF_SCHEMA`
    table references as ``tasks`` (default: in this process), the reference count and the run's files. With
    ``queries`` (the folder's queries files), a line naming a query they lack is such an error too: a run for
    another dataset, or ids written differently, would otherwise be dropped without a word."""
    files = {"queries": queries, "run": run_files(run)} if queries else {"run": run_files(run)}
    tables, counts, _ = read_checked(files, "fail", tasks or LocalTasks(), hint=False)
    return tables["run"], counts["run"], files["run"]


class BM25Index:
    """bm25s over the corpus (title + text), English stopwords."""

    def __init__(self, doc_ids: list[str], doc_texts: list[str]):
        import bm25s

        self.doc_ids = doc_ids
        self._bm25s = bm25s
        self.retriever = bm25s.BM25()
        self.retriever.index(
            bm25s.tokenize(doc_texts, stopwords="en", show_progress=False), show_progress=False
        )

    @classmethod
    def from_corpus(cls, data: BeirData) -> BM25Index:
        """An index over a BEIR corpus, each document read as title + text."""
        table = corpus_table(data)
        return cls(table.column("doc_id").to_pylist(), table.column("doc_text").to_pylist())

    def search(self, queries: list[str], k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` doc ids per query (best first) and their scores ``[n, k]``."""
        k = min(k, len(self.doc_ids))
        tokens = self._bm25s.tokenize(queries, stopwords="en", show_progress=False)
        indices, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [[self.doc_ids[i] for i in row] for row in indices], scores


def random_hits(doc_ids: Sequence[str], query_ids: Sequence[str], k: int, seed: int = 0) -> list[list[str]]:
    """``k`` of ``doc_ids`` per query, drawn uniformly without replacement (all of them, shuffled, when ``k`` is
    not smaller). A query's draw depends only on its id, the seed and the corpus, not on the other queries."""
    hits = []
    for query_id in query_ids:
        rng = np.random.default_rng([seed, zlib.crc32(query_id.encode())])
        hits.append([doc_ids[i] for i in rng.choice(len(doc_ids), size=min(k, len(doc_ids)), replace=False)])
    return hits


def candidate_references(
    data: BeirData, spec, query_ids: Sequence[str], seed: int = 0
) -> tuple[pa.Table, list]:
    """The references of ``spec`` (a parsed `specs.CandidateSpec`: all, bm25:K, random:K or a run) for
    ``query_ids`` of an in-process folder, and the files they name (a run's). ``seed`` seeds random:K."""
    if spec.kind == "all":
        doc_ids = list(data.corpus)
        if len(query_ids) * len(doc_ids) > MAX_ALL_PAIRS:
            raise DataError(
                f"candidates 'all': {len(query_ids):,} queries x {len(doc_ids):,} documents = "
                f"{len(query_ids) * len(doc_ids):,} pairs, more than {MAX_ALL_PAIRS:,}; use bm25:K (e.g. bm25:100) "
                "or a TREC run file instead, or fewer queries"
            )
        return ranked_references(query_ids, [doc_ids] * len(query_ids)), []
    if spec.kind == "bm25":
        hits, _ = BM25Index.from_corpus(data).search([data.queries[q].text for q in query_ids], spec.k)
        return ranked_references(query_ids, hits), []
    if spec.kind == "random":
        return ranked_references(query_ids, random_hits(list(data.corpus), query_ids, spec.k, seed)), []
    if spec.kind == "run":
        tables, _, files = read_run(spec.path, queries=input_files(data.root, "queries"))
        return pa.concat_tables(tables), files
    raise DataError(f"candidates {spec.text!r}: {spec.kind} candidates need a student (round_pool only)")
