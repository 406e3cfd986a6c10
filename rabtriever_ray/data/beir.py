"""BEIR folders: the data types and the two readers, both over the same tasks (`checks.read_checked`).

A BEIR folder holds ``corpus`` (``_id``, ``title``, ``text``, optional ``metadata``), ``queries`` (``_id``,
``text``, optional ``metadata``) and ``qrels/<split>.tsv`` (header ``query-id corpus-id score``); corpus and
queries as JSONL, gzipped JSONL, Parquet or a folder of such shards (`files.input_files`). Files are UTF-8, with or
without a byte-order mark, with LF or CRLF line endings; neither reaches an id, a text or a score.

Every row is checked (`rows`): malformed JSON, a row that is not an object, a missing or non-string ``_id`` /
``text``, an empty query text, a document with neither title nor text, a non-object ``metadata``, a duplicate id, a
malformed qrel line, a qrel naming an unknown query or document, and a line that is not UTF-8 (field
``<encoding>``). With ``on_bad_row="fail"`` (the default) the first bad row in file order stops the read with a
`DataError` naming file, line and field. With ``"skip"`` the row is left out and recorded in ``rejects`` (file,
line, field, reason, raw text with any byte that is not UTF-8 written as ``\\x8a``); `rows.write_rejects` writes
them as JSONL. Nothing is dropped silently.

- `read_beir` runs the tasks in this process and returns plain Python (`BeirData`): for small folders, evaluation
  and the in-process candidate policies.
- `read_beir_dataset` runs them in Ray and returns Ray Datasets (`BeirDatasets`): for corpora of any size, where
  the driver holds counts, never the corpus. `read_corpus_dataset` reads only the corpus.
- `as_datasets` turns a `BeirData` into the `BeirDatasets` the Ray stages take; `corpus_table`,
  `queries_table` and `qrels_table` give its columns as Arrow tables.

The corpus as the models read it is ``doc_id, doc_text`` (title, newline, text: `prompts.document_text`); queries
are ``query_id, query_text``; qrels ``query_id, doc_id, grade``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from ..prompts import document_text
from .checks import read_checked
from .files import input_files, qrels_file
from .rows import BadRow, DataError, OnBadRow, reject_counts
from .tasks import LocalTasks, RayTasks

# The bundled demo task (household-robot skills, BEIR layout, train/dev splits); see demo_data/README.md.
DEMO_DATA = Path(__file__).resolve().parent.parent / "demo_data"


def data_root(path: str | Path | None, sub: str | Path | None = None) -> Path:
    """The BEIR folder a config names (``path``; empty: the bundled demo data), with ``sub`` below it."""
    root = Path(path) if path else DEMO_DATA
    return root / sub if sub else root


@dataclass
class Document:
    title: str
    text: str


@dataclass
class Query:
    text: str


@dataclass
class BeirData:
    """One BEIR folder (and split) in memory.

    ``queries`` holds the split's queries (those named in ``qrels/<split>.tsv``) when a split is given, else all.
    ``qrels[query_id][doc_id]`` is the graded judgement; a score > 0 is relevant.
    """

    root: Path
    split: str | None
    corpus: dict[str, Document]
    queries: dict[str, Query]
    qrels: dict[str, dict[str, int]]
    rejects: list[BadRow] = field(default_factory=list)

    def reject_counts(self) -> dict[str, int]:
        return reject_counts(self.rejects)


@dataclass
class BeirDatasets:
    """A BEIR folder as materialized Ray Datasets (see the module docstring), with counts and rejected rows."""

    root: Path
    split: str | None
    corpus: Any  # doc_id, doc_text
    queries: Any  # query_id, query_text (the split's queries when a split is given)
    qrels: Any | None  # query_id, doc_id, grade; None without a split
    counts: dict[str, int] = field(default_factory=dict)
    rejects: list[BadRow] = field(default_factory=list)

    def reject_counts(self) -> dict[str, int]:
        return reject_counts(self.rejects)


def _files(
    root: str | Path, split: str | None, kinds=("corpus", "queries")
) -> tuple[Path, dict[str, list[Path]]]:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    files = {kind: input_files(root, kind) for kind in kinds}
    if split is not None:
        files["qrels"] = [qrels_file(root, split)]
    return root, files


def doc_texts(corpus: pa.Table) -> pa.Table:
    """Read corpus rows (``doc_id, title, text``) as the models read them: ``doc_id, doc_text``."""
    titles, texts = corpus.column("title").to_pylist(), corpus.column("text").to_pylist()
    return pa.table(
        {
            "doc_id": corpus.column("doc_id"),
            "doc_text": pa.array([document_text(t, x) for t, x in zip(titles, texts)], pa.string()),
        }
    )


def read_beir(root: str | Path, split: str | None = None, on_bad_row: OnBadRow = "fail") -> BeirData:
    """Read and validate a BEIR folder in this process; with ``split``, keep the queries that
    ``qrels/<split>.tsv`` names."""
    root, files = _files(root, split)
    tables, _, bad = read_checked(files, on_bad_row, LocalTasks(), split=split is not None)
    corpus_rows = pa.concat_tables(tables["corpus"])
    corpus = {
        did: Document(title, text)
        for did, title, text in zip(*(corpus_rows.column(c).to_pylist() for c in ("doc_id", "title", "text")))
    }
    queries = query_dict(tables["queries"])
    qrels: dict[str, dict[str, int]] = {}
    if split is not None:
        judged = pa.concat_tables(tables["qrels"])
        for qid, did, grade in zip(*(judged.column(c).to_pylist() for c in ("query_id", "doc_id", "grade"))):
            qrels.setdefault(qid, {})[did] = grade
    return BeirData(root, split, corpus, queries, qrels, bad)


def query_dict(tables: list[pa.Table]) -> dict[str, Query]:
    """Read query rows (``query_id, query_text``) as `BeirData.queries` holds them."""
    rows = pa.concat_tables(tables)
    return {
        qid: Query(text)
        for qid, text in zip(rows.column("query_id").to_pylist(), rows.column("query_text").to_pylist())
    }


def read_corpus_dataset(root: str | Path, on_bad_row: OnBadRow = "fail", cpus: float = 1.0):
    """The corpus of a BEIR folder read in Ray as a Dataset (``doc_id``, ``doc_text``), validated and without
    duplicate ids; returns ``(dataset, documents, rejects)``."""
    import ray.data

    _, files = _files(root, None, ("corpus",))
    tables, counts, bad = read_checked(files, on_bad_row, RayTasks(), cpus)
    corpus = ray.data.from_arrow_refs(tables["corpus"]).map_batches(
        doc_texts, batch_size=None, batch_format="pyarrow"
    )
    return corpus, counts["corpus"], bad


def read_beir_dataset(
    root: str | Path, split: str | None = None, on_bad_row: OnBadRow = "fail", cpus: float = 1.0
) -> BeirDatasets:
    """Read and validate a BEIR folder in Ray tasks (the rules and messages of `read_beir`); with ``split``, keep
    the queries that ``qrels/<split>.tsv`` names."""
    import ray.data

    root, files = _files(root, split)
    tables, counts, bad = read_checked(files, on_bad_row, RayTasks(), cpus, split=split is not None)
    corpus = ray.data.from_arrow_refs(tables["corpus"]).map_batches(
        doc_texts, batch_size=None, batch_format="pyarrow"
    )
    queries = ray.data.from_arrow_refs(tables["queries"]).select_columns(["query_id", "query_text"])
    qrels = None
    if split is not None:
        qrels = ray.data.from_arrow_refs(tables["qrels"]).select_columns(["query_id", "doc_id", "grade"])
    out = {"documents": counts["corpus"], "queries": queries.count()}
    if qrels is not None:
        out["qrels"] = counts["qrels"]
    return BeirDatasets(root, split, corpus, queries, qrels, out, bad)


def corpus_table(data: BeirData, doc_ids=None) -> pa.Table:
    """``doc_id, doc_text`` of the corpus (or of ``doc_ids``), in corpus order."""
    ids = list(data.corpus) if doc_ids is None else list(doc_ids)
    texts = [document_text(data.corpus[d].title, data.corpus[d].text) for d in ids]
    return pa.table({"doc_id": pa.array(ids, pa.string()), "doc_text": pa.array(texts, pa.string())})


def queries_table(data: BeirData, query_ids=None) -> pa.Table:
    """``query_id, query_text`` of the queries (or of ``query_ids``), in the order given."""
    ids = list(data.queries) if query_ids is None else list(query_ids)
    texts = [data.queries[q].text for q in ids]
    return pa.table({"query_id": pa.array(ids, pa.string()), "query_text": pa.array(texts, pa.string())})


def qrels_table(data: BeirData) -> pa.Table:
    """``query_id, doc_id, grade`` of every judgement."""
    rows = [(q, d, g) for q, judged in data.qrels.items() for d, g in judged.items()]
    return pa.table(
        {
            "query_id": pa.array([r[0] for r in rows], pa.string()),
            "doc_id": pa.array([r[1] for r in rows], pa.string()),
            "grade": pa.array([r[2] for r in rows], pa.int32()),
        }
    )


def as_datasets(data: BeirData, query_ids=None, rows_per_block: int = 1024) -> BeirDatasets:
    """A `BeirData` (its queries, or ``query_ids`` of them) as the `BeirDatasets` the Ray stages take."""
    import ray.data

    def dataset(table: pa.Table):
        n = max(len(table), 1)
        return ray.data.from_arrow([table.slice(i, rows_per_block) for i in range(0, n, rows_per_block)])

    queries = queries_table(data, query_ids)
    counts = {"documents": len(data.corpus), "queries": len(queries)}
    qrels = None
    if data.split is not None:
        judged = qrels_table(data)
        qrels, counts["qrels"] = dataset(judged), len(judged)
    return BeirDatasets(
        data.root,
        data.split,
        dataset(corpus_table(data)),
        dataset(queries),
        qrels,
        counts,
        list(data.rejects),
    )
