"""Candidate pairs: references (`candidates`) joined with the queries, the corpus and the qrels.

One set of row functions builds the pairs (`positive_references` adds the qrel positives a training list misses,
`finish_pairs` labels and keeps a (query, document) once at its best rank, `rank_order` orders a query's list);
two drivers run them: `build_pairs` in this process over a `BeirData` (pyarrow joins; small folders, evaluation),
`join_pairs` in Ray Data over `BeirDatasets` (hash joins; any size). A test checks that both give the same rows.

Pairs, one row per (query, document), in `PAIR_SCHEMA`:

=============  ========  ============================================================================
column         dtype     meaning
=============  ========  ============================================================================
query_id       string    query ``_id``
doc_id         string    document ``_id``
label          int8      qrel grade; 0 when the query is judged but this document is not; -1 when the
                         split has no judgements (unknown)
query_text     string    the query text
doc_text       string    the document as the model reads it: title, newline, text
=============  ========  ============================================================================

`build_pairs` returns the pairs query by query (in the order of the queries), each list in rank order. In training
mode `join_pairs` groups them by query too (every block holds whole lists in rank order); otherwise its blocks are
grouped by document, what the teacher's prefix sharing wants.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from ..specs import CANDIDATES, parse_spec
from .beir import (
    BeirData,
    BeirDatasets,
    Document,
    Query,
    corpus_table,
    qrels_table,
    queries_table,
    read_beir_dataset,
)
from .candidates import candidate_references, read_run, references
from .files import input_files
from .rows import DataError, OnBadRow
from .sampling import sample_queries, sample_query_ids
from .tasks import RayTasks

PAIR_SCHEMA = pa.schema(
    [
        ("query_id", pa.string()),
        ("doc_id", pa.string()),
        ("label", pa.int8()),
        ("query_text", pa.string()),
        ("doc_text", pa.string()),
    ]
)
ROWS_PER_PARTITION = 4096  # join and group-by partitions hold about this many candidate pairs


def positive_references(qrels: pa.Table) -> pa.Table:
    """Qrel positives (grade > 0) as references ranked after every candidate."""
    qrels = qrels.filter(pc.greater(qrels.column("grade"), 0))
    return references(qrels.column("query_id"), qrels.column("doc_id"), pa.array([math.inf] * len(qrels)))


def finish_pairs(joined: pa.Table, judged: bool | Collection[str]) -> pa.Table:
    """References joined with qrels, queries and corpus, to pairs: labels from the grades, and a (query, document)
    seen twice kept at its best rank (both copies must be in ``joined``). An unknown document keeps a null text.

    An ungraded pair is 0 (judged query, unjudged document) or -1 (unknown): ``judged`` says which queries are
    judged, all (True), none (False) or those it holds (a split's judged queries beside unlabelled ones,
    `training.training_queries`)."""
    grades = joined.column("grade").to_pylist() if "grade" in joined.column_names else [None] * len(joined)
    if isinstance(judged, bool):
        defaults = [0 if judged else -1] * len(joined)
    else:
        defaults = [0 if q in judged else -1 for q in joined.column("query_id").to_pylist()]
    table = pa.table(
        {
            "query_id": joined.column("query_id"),
            "doc_id": joined.column("doc_id"),
            "label": pa.array([d if g is None else g for d, g in zip(defaults, grades)], pa.int8()),
            "query_text": joined.column("query_text"),
            "doc_text": joined.column("doc_text"),
            "rank": joined.column("rank"),
            "_file": joined.column("_file"),
            "_line": joined.column("_line"),
        }
    )
    table = table.sort_by([("doc_id", "ascending"), ("query_id", "ascending"), ("rank", "ascending")])
    keys = list(zip(table.column("query_id").to_pylist(), table.column("doc_id").to_pylist()))
    first = [i == 0 or keys[i] != keys[i - 1] for i in range(len(keys))]
    return table.filter(pa.array(first, pa.bool_()))


def rank_order(group: pa.Table) -> pa.Table:
    """One query's candidates in rank order (ties by document id), in `PAIR_SCHEMA`."""
    return pair_columns(group.sort_by([("rank", "ascending"), ("doc_id", "ascending")]))


def pair_columns(batch: pa.Table) -> pa.Table:
    return batch.select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA)


def _unknown_document(pairs: pa.Table, files: Sequence[Path]) -> None:
    """A `DataError` naming the first reference (in file order) to a document the corpus lacks."""
    missing = pairs.filter(pc.is_null(pairs.column("doc_text")))
    if len(missing):
        row = missing.sort_by([("_file", "ascending"), ("_line", "ascending")]).slice(0, 1).to_pylist()[0]
        where = f"{files[row['_file']]}:{row['_line']}" if 0 <= row["_file"] < len(files) else "a reference"
        raise DataError(f"{where}: field 'docid': unknown document {row['doc_id']!r}")


def build_pairs(
    data: BeirData,
    candidates: str = "all",
    max_queries: int | None = None,
    seed: int = 0,
    training: bool = False,
    query_ids: Sequence[str] | None = None,
) -> pa.Table:
    """Candidate pairs of an in-process folder (`PAIR_SCHEMA`), query by query in the order of ``query_ids``
    (default: the `sampling` sample of ``max_queries``), each list in rank order. In training mode the qrel
    positives a list misses are added after it. ``seed`` also seeds ``random:K`` candidates."""
    spec = parse_spec(candidates, "candidates", CANDIDATES, DataError)
    query_ids = (
        list(query_ids) if query_ids is not None else sample_query_ids(list(data.queries), max_queries, seed)
    )
    refs, files = candidate_references(data, spec, query_ids, seed)
    return pairs_from_references(data, refs, query_ids, training, files)


def pairs_from_references(
    data: BeirData,
    refs: pa.Table,
    query_ids: Sequence[str],
    training: bool = False,
    files: Sequence[Path] = (),
) -> pa.Table:
    """`build_pairs` of references already made (`REF_SCHEMA`; ``files`` are those ``_file`` indexes)."""
    judged = data.split is not None
    qrels = qrels_table(data) if judged else None
    if training and qrels is not None:
        refs = pa.concat_tables([refs, positive_references(qrels)])
    if qrels is not None:
        refs = refs.join(qrels, ["query_id", "doc_id"], join_type="left outer")
    queries = queries_table(data, query_ids)
    known = [d for d in pc.unique(refs.column("doc_id")).to_pylist() if d in data.corpus]
    joined = refs.join(queries, "query_id", join_type="inner").join(
        corpus_table(data, known), "doc_id", join_type="left outer"
    )
    # A split's queries are judged, unless queries without judgements were given beside them.
    pairs = finish_pairs(joined, judged and (all(q in data.qrels for q in query_ids) or data.qrels.keys()))
    _unknown_document(pairs, files)
    order = pc.index_in(pairs.column("query_id"), value_set=queries.column("query_id"))
    pairs = pairs.append_column("_query", order).sort_by(
        [("_query", "ascending"), ("rank", "ascending"), ("doc_id", "ascending")]
    )
    return pair_columns(pairs)


def _partitions(rows: int) -> int:
    return max(1, math.ceil(rows / ROWS_PER_PARTITION))


def run_pairs(
    beir: BeirDatasets,
    run: str | Path,
    training: bool = False,
    max_queries: int | None = None,
    seed: int = 0,
    cpus: float = 1.0,
    min_partitions: int = 1,
):
    """Candidate pairs of a TREC run (a file or a folder of shards) read and joined in Ray; returns
    ``(dataset, counts)`` (`join_pairs`)."""
    import ray.data

    tables, n, files = read_run(run, RayTasks(), input_files(Path(beir.root), "queries"))
    refs = ray.data.from_arrow_refs(tables)
    return join_pairs(beir, refs, n, training, max_queries, seed, min_partitions, files)


def join_pairs(
    beir: BeirDatasets,
    refs,
    n: int,
    training: bool = False,
    max_queries: int | None = None,
    seed: int = 0,
    min_partitions: int = 1,
    files: Sequence[Path] = (),
):
    """Candidate pairs of ``n`` references in a Dataset (``refs``, `REF_SCHEMA`), joined in Ray Data; returns
    ``(dataset, {"pairs", "queries"})``.

    The queries are the `sampling` sample of ``max_queries``; a document is kept once per query (its best rank).
    Joins and the group-by use about one partition per `ROWS_PER_PARTITION` references, at least
    ``min_partitions`` (so that small inputs still spread over several actors).
    """
    queries = sample_queries(beir.queries, max_queries, seed)
    if training and beir.qrels is not None:
        refs = refs.union(beir.qrels.map_batches(positive_references, batch_format="pyarrow"))
        n += beir.counts["qrels"]
    parts = max(min_partitions, _partitions(n))
    if beir.qrels is not None:
        refs = refs.join(beir.qrels, "left_outer", parts, on=("query_id", "doc_id"))
    joined = (
        refs.join(queries, "inner", parts, on=("query_id",))
        .join(beir.corpus, "left_outer", parts, on=("doc_id",))
        .map_batches(finish_pairs, fn_kwargs={"judged": beir.qrels is not None}, batch_format="pyarrow")
        .materialize()
    )
    missing = joined.map_batches(
        lambda b: b.filter(pc.is_null(b.column("doc_text"))), batch_format="pyarrow"
    ).take(1)
    if missing:
        _unknown_document(pa.Table.from_pylist(missing), files)
    if training:
        pairs = joined.groupby("query_id", num_partitions=parts).map_groups(
            rank_order, batch_format="pyarrow"
        )
    else:
        pairs = joined.map_batches(pair_columns, batch_format="pyarrow")
    pairs = pairs.materialize()
    return pairs, {"pairs": pairs.count(), "queries": queries.count()}


def run_subset(
    root: str | Path,
    split: str,
    run: str | Path,
    max_queries: int | None = None,
    seed: int = 0,
    on_bad_row: OnBadRow = "fail",
) -> tuple[BeirData, pa.Table]:
    """A run's candidate pairs (`run_pairs`, not training mode) gathered in the driver, with a `BeirData` that holds
    only what they name: the selected queries (those the run lists no document for included: they score 0),
    their qrels and the documents among their candidates.

    For validation and evaluation sets: a few thousand queries' candidates are small even when their corpus is
    not, so the in-process code that scores, times and ranks them (BM25 included, over these documents) runs
    unchanged. Each document's text is `Document.text` with an empty title: `prompts.document_text` reads it as
    the pair does. The pairs are sorted by query, then document.
    """
    import ray

    data = read_beir_dataset(root, split, on_bad_row=on_bad_row)
    chosen = sample_queries(data.queries, max_queries, seed)
    pairs, _ = run_pairs(replace(data, queries=chosen), run)
    table = pa.concat_tables([ray.get(ref) for ref in pairs.to_arrow_refs()]).cast(PAIR_SCHEMA)
    table = table.sort_by([("query_id", "ascending"), ("doc_id", "ascending")])
    selected = sorted(chosen.take_all(), key=lambda row: row["query_id"])
    wanted = pa.array([row["query_id"] for row in selected], pa.string())
    judged = data.qrels.map_batches(
        lambda b: b.filter(pc.is_in(b.column("query_id"), wanted)), batch_format="pyarrow"
    ).take_all()
    qrels: dict[str, dict[str, int]] = {}
    for row in judged:
        qrels.setdefault(row["query_id"], {})[row["doc_id"]] = row["grade"]
    queries = {row["query_id"]: Query(row["query_text"]) for row in selected}
    corpus: dict[str, Document] = {}
    for did, dtext in zip(table.column("doc_id").to_pylist(), table.column("doc_text").to_pylist()):
        corpus.setdefault(did, Document("", dtext))
    return BeirData(Path(root), split, corpus, queries, qrels, data.rejects), table


def read_pairs(
    root: str | Path, split: str, candidates: str, max_queries: int | None = None, seed: int = 0
) -> tuple[BeirData, pa.Table]:
    """The candidate pairs of a split's sampled queries and a `BeirData` holding what they need: a run file is
    read and joined in Ray (`run_subset`: the driver never holds the corpus), the other specs are built in this
    process (`build_pairs`) from the whole folder. For validation sets."""
    from .beir import read_beir

    if parse_spec(candidates, "candidates", CANDIDATES, DataError).is_run:
        from ..runtime import init_ray

        init_ray()
        return run_subset(root, split, candidates, max_queries, seed)
    data = read_beir(root, split)
    return data, build_pairs(data, candidates, max_queries, seed)
