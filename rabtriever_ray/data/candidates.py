"""Candidate (query, document) pairs for the teacher to score.

Policies (``candidates=``):

- ``all``: every document for every query (small corpora, e.g. the 8 ESConv strategies); refused when queries x
  documents exceeds `MAX_ALL_PAIRS`.
- ``bm25:K``: the top K documents per query by BM25 (bm25s over title + text).
- a path to a TREC run file (``qid Q0 docid rank score tag``): the documents it lists per query, by rank.

In training mode the qrel positives (score > 0) are added to a query's candidates when missing. ``max_queries``
takes a seeded subset of the queries.

`build_pairs` returns a pyarrow Table, one row per pair, in query order then candidate order:

=============  ========  ============================================================================
column         dtype     meaning
=============  ========  ============================================================================
query_id       string    query ``_id``
doc_id         string    document ``_id``
label          int8      qrel grade; 0 when the query is judged but this document is not; -1 when the
                         query has no judgements (unknown)
query_text     string    the query text
doc_text       string    the document as the model reads it: title, newline, text
=============  ========  ============================================================================
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pyarrow as pa

from ..prompts import document_text
from .beir import BeirData, DataError, RowError, _lines, _Validator

# The most pairs the ``all`` policy builds. Every pair carries its full document text in the driver and costs the
# teacher one forward, so queries x documents bounds both; a million pairs (about 1 GB of text at 1 kB a pair, hours
# of teacher time) is well past every task that means "all" (ESConv: 12,235 training queries x 8 strategies =
# 97,880 pairs; the demo: 150 x 30) and refuses a full-corpus retrieval set (SciFact test: 300 x 5,183).
MAX_ALL_PAIRS = 1_000_000

PAIR_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("label", pa.int8()),
        ("query_text", pa.string()),
        ("doc_text", pa.string()),
    ]
)


def spec_count(spec: str, option: str, error: type[ValueError] = DataError) -> int:
    """K of a ``name:K`` spec given as ``option``; ``error`` (naming both) when K is not an integer >= 1."""
    name, _, count = spec.partition(":")
    try:
        k = int(count)
    except ValueError as err:
        raise error(f"{option} {spec!r}: expected {name}:K with an integer K") from err
    if k < 1:
        raise error(f"{option} {spec!r}: K must be >= 1")
    return k


def is_run_file(spec: str) -> bool:
    """Whether a candidates spec names a run file (`parse_candidates`, which checks it)."""
    return parse_candidates(spec)[0] == "run"


def parse_candidates(spec: str) -> tuple[str, int | Path | None]:
    """``"all"`` -> ("all", None); ``"bm25:K"`` -> ("bm25", K); anything else is a run file path."""
    if spec == "all":
        return "all", None
    if spec.startswith("bm25:"):
        return "bm25", spec_count(spec, "candidates")
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"candidates {spec!r}: not 'all', not 'bm25:K', and no run file at {path}")
    return "run", path


def select_queries(data: BeirData, max_queries: int | None = None, seed: int = 0) -> list[str]:
    """All query ids in file order, or a seeded sample of ``max_queries`` of them (kept in file order)."""
    ids = list(data.queries)
    if max_queries is None or max_queries >= len(ids):
        return ids
    chosen = set(random.Random(seed).sample(ids, max_queries))
    return [qid for qid in ids if qid in chosen]


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
        return cls(list(data.corpus), [document_text(d.title, d.text) for d in data.corpus.values()])

    def search(self, queries: list[str], k: int) -> tuple[list[list[str]], np.ndarray]:
        """Top-``k`` doc ids per query (best first) and their scores ``[n, k]``."""
        k = min(k, len(self.doc_ids))
        tokens = self._bm25s.tokenize(queries, stopwords="en", show_progress=False)
        indices, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return [[self.doc_ids[i] for i in row] for row in indices], scores


RUN_FORMAT = "qid Q0 docid rank score tag"


def parse_run_line(raw: str) -> tuple[str, str, float] | None:
    """A TREC run line as ``(query_id, doc_id, rank)``, None when blank; `RowError` names the field at fault."""
    parts = raw.split()
    if not parts:
        return None
    if len(parts) != 6:
        raise RowError("<row>", f"expected {RUN_FORMAT!r}, got {len(parts)} fields")
    try:
        return parts[0], parts[2], float(parts[3])
    except ValueError:
        raise RowError("rank", f"not a number: {parts[3]!r}") from None


def read_run(path: Path, data: BeirData) -> dict[str, list[str]]:
    """A TREC run file as ``{query_id: [doc_id, ...]}`` ordered by rank; a bad line or an unknown document id is
    a `DataError` naming file, line and field."""
    ranked: dict[str, list[tuple[float, str]]] = {}
    for line_no, raw in _lines(path, _Validator("fail", hint=False)):
        try:
            parsed = parse_run_line(raw)
        except RowError as err:
            raise DataError(f"{path}:{line_no}: field {err.field!r}: {err.reason}") from None
        if parsed is None:
            continue
        qid, doc_id, rank = parsed
        if doc_id not in data.corpus:
            raise DataError(f"{path}:{line_no}: field 'docid': unknown document {doc_id!r}")
        ranked.setdefault(qid, []).append((rank, doc_id))
    out = {}
    for qid, rows in ranked.items():
        seen: dict[str, None] = {}
        for _, doc_id in sorted(rows):
            seen.setdefault(doc_id)
        out[qid] = list(seen)
    return out


def build_pairs(
    data: BeirData,
    candidates: str = "all",
    max_queries: int | None = None,
    seed: int = 0,
    training: bool = False,
    query_ids: list[str] | None = None,
) -> pa.Table:
    """Candidate pairs as a pyarrow Table (schema in the module docstring)."""
    query_ids = query_ids if query_ids is not None else select_queries(data, max_queries, seed)
    policy, arg = parse_candidates(candidates)
    doc_ids = list(data.corpus)
    if policy == "all":
        if len(query_ids) * len(doc_ids) > MAX_ALL_PAIRS:
            raise DataError(
                f"candidates 'all': {len(query_ids):,} queries x {len(doc_ids):,} documents = "
                f"{len(query_ids) * len(doc_ids):,} pairs, more than {MAX_ALL_PAIRS:,}; use bm25:K (e.g. bm25:100) "
                "or a TREC run file instead, or fewer queries"
            )
        per_query = {qid: doc_ids for qid in query_ids}
    elif policy == "bm25":
        index = BM25Index.from_corpus(data)
        hits, _ = index.search([data.queries[qid].text for qid in query_ids], int(arg))
        per_query = dict(zip(query_ids, hits))
    else:
        run = read_run(Path(arg), data)
        per_query = {qid: run.get(qid, []) for qid in query_ids}
    rows: dict[str, list] = {name: [] for name in PAIR_SCHEMA.names}
    doc_texts = {doc_id: document_text(doc.title, doc.text) for doc_id, doc in data.corpus.items()}
    for qid in query_ids:
        judged = data.qrels.get(qid)
        chosen = list(per_query[qid])
        if training and judged:
            chosen += [d for d, grade in judged.items() if grade > 0 and d not in chosen]
        for doc_id in chosen:
            rows["query_id"].append(qid)
            rows["doc_id"].append(doc_id)
            rows["label"].append(judged.get(doc_id, 0) if judged else -1)
            rows["query_text"].append(data.queries[qid].text)
            rows["doc_text"].append(doc_texts[doc_id])
    return pa.table(rows, schema=PAIR_SCHEMA)
