"""BEIR folders and TREC runs read and validated in Ray tasks, and candidate pairs joined in Ray Data: the path
for corpora of any size, where the driver holds counts, never the corpus.

`beir.read_beir` and `candidates.build_pairs` hold a corpus in one process: right for evaluation, the demo and
``bm25:K`` candidates (one BM25 index over the whole corpus, which fits one node up to a few million documents).
Here every file is read and validated in Ray tasks, and candidate pairs come from a TREC run joined with the
qrels, the queries and the corpus by Ray Data's hash joins, as distillation toolkits do at scale.

Inputs, in a BEIR folder ``root``:

- ``corpus`` and ``queries``: ``<stem>.jsonl``, ``<stem>.jsonl.gz``, ``<stem>.parquet``, or a folder ``<stem>/`` of
  such shards read in name order. Parquet columns are the JSONL fields; a Parquet row's "line" is its row number
  (from 1).
- ``qrels/<split>.tsv``, as in `beir`.
- a TREC run (``qid Q0 docid rank score tag``): a file or a folder of shards.

Every rule of `beir` holds, with the same file, line, field and reason (`beir`'s row parsers are shared). An
uncompressed file is read in byte ranges of `RANGE_BYTES`, one task each; line numbers stay exact because each
range's newlines are counted first. Each read task also hashes its ids into buckets (one per GiB of input); one
task per bucket then finds duplicate ids (the first in file and line order is kept; a later one is rejected,
naming where the first is) and qrels naming an unknown query or document. The driver receives row counts and the
rejected rows: with ``on_bad_row="fail"`` the first in file order is raised as `DataError`; with ``"skip"`` they
are returned for ``rejects.jsonl``, and filter tasks drop them. A bad run line, or one naming an unknown document,
is always an error.

`read_beir_dataset` returns a `BeirDatasets`: Ray Datasets (over the read tasks' blocks in the object store) of the
corpus (``doc_id``, ``doc_text``: title, newline, text), the split's queries (``query_id``, ``query_text``) and the
qrels (``query_id``, ``doc_id``, ``grade``). `run_pairs` turns a run into candidate pairs in `PAIR_SCHEMA`, the
columns `build_pairs` returns.
"""

from __future__ import annotations

import hashlib
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..prompts import document_text
from .beir import (
    BadRow,
    BeirData,
    DataError,
    Document,
    OnBadRow,
    Query,
    RowError,
    _Validator,
    decode_line,
    duplicate_reason,
    parse_json_line,
    parse_qrel,
    parse_record,
    qrels_file,
    raw_text,
    reject_counts,
)
from .candidates import PAIR_SCHEMA, parse_run_line

Kind = Literal["corpus", "queries", "qrels", "run"]

RANGE_BYTES = 64 << 20  # an uncompressed JSONL file is read in ranges of this many bytes, one read task each
ROWS_PER_PARTITION = 4096  # join and group-by partitions hold about this many candidate pairs
_RAW_CHARS = 2000  # as much of a bad row as a reject keeps (as `beir` does)

# The rows a read task keeps (good rows only): ids, payload, and where each came from.
_WHERE = [("_file", pa.int32()), ("_line", pa.int64())]
READ_SCHEMAS: dict[str, pa.Schema] = {
    "corpus": pa.schema([("doc_id", pa.string()), ("doc_text", pa.string()), *_WHERE]),
    "queries": pa.schema([("query_id", pa.string()), ("query_text", pa.string()), *_WHERE]),
    "qrels": pa.schema(
        [
            ("query_id", pa.string()),
            ("doc_id", pa.string()),
            ("grade", pa.int32()),
            ("raw", pa.string()),
            *_WHERE,
        ]
    ),
    "run": pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("rank", pa.float64()), *_WHERE]),
}
REF_SCHEMA = READ_SCHEMAS["run"]  # candidate references, before they are joined to pairs (`join_pairs`)


def input_files(root: Path, stem: str) -> list[Path]:
    """``root/<stem>.jsonl``, ``.jsonl.gz`` or ``.parquet``, or the shards in the folder ``root/<stem>/``."""
    for suffix in (".jsonl", ".jsonl.gz", ".parquet"):
        if (root / f"{stem}{suffix}").is_file():
            return [root / f"{stem}{suffix}"]
    folder = root / stem
    if folder.is_dir():
        shards = sorted(p for p in folder.iterdir() if p.is_file() and _format(p) is not None)
        if shards:
            return shards
        raise DataError(f"{folder}: no .jsonl, .jsonl.gz or .parquet shards")
    raise DataError(
        f"{root}: no {stem}.jsonl, {stem}.jsonl.gz, {stem}.parquet or {stem}/ folder of shards (is this a BEIR folder?)"
    )


def _format(path: Path) -> str | None:
    name = path.name
    if name.endswith(".jsonl.gz") or name.endswith(".tsv.gz") or name.endswith(".trec.gz"):
        return "gz"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".jsonl", ".tsv", ".trec", ".txt", ".run")):
        return "text"
    return None


@dataclass(frozen=True)
class Shard:
    """What one read task reads: bytes ``[start, end)`` of a file (``end`` -1: to the end), whose line at or after
    ``start`` is line ``first_line``."""

    kind: str
    path: str
    file_index: int
    fmt: str
    start: int = 0
    end: int = -1
    first_line: int = 1


def _count_newlines(path: str, start: int, end: int) -> int:
    count, chunk = 0, 8 << 20
    with open(path, "rb") as handle:
        handle.seek(start)
        left = end - start
        while left > 0:
            data = handle.read(min(chunk, left))
            if not data:
                break
            count += data.count(b"\n")
            left -= len(data)
    return count


def plan_shards(kind: Kind, files: list[Path], range_bytes: int = RANGE_BYTES) -> list[Shard]:
    """One shard per compressed or Parquet file, one per ``range_bytes`` of an uncompressed text file (their first
    line numbers from newline counts done in Ray tasks)."""
    import ray

    shards: list[Shard] = []
    counting: list[tuple[int, Any]] = []
    count_task = ray.remote(num_cpus=0.25)(_count_newlines)
    for index, path in enumerate(files):
        fmt = _format(path) or "text"
        size = path.stat().st_size
        if fmt != "text" or size <= range_bytes:
            shards.append(Shard(kind, str(path.resolve()), index, fmt))
            continue
        starts = list(range(0, size, range_bytes))
        first = len(shards)
        for start in starts:
            shards.append(Shard(kind, str(path.resolve()), index, fmt, start, min(start + range_bytes, size)))
        refs = [count_task.remote(str(path.resolve()), s, min(s + range_bytes, size)) for s in starts[:-1]]
        counting.append((first, refs))
    for first, refs in counting:
        line = 1
        for offset, newlines in enumerate([0, *ray.get(refs)]):
            line += newlines
            shard = shards[first + offset]
            shards[first + offset] = replace(shard, first_line=line)
    return shards


def _shard_lines(shard: Shard):
    """``(line_no, raw bytes)`` of the lines that start inside the shard's byte range."""
    import gzip

    if shard.fmt == "gz":
        with gzip.open(shard.path, "rb") as handle:
            yield from enumerate(handle, start=1)
        return
    with open(shard.path, "rb") as handle:
        line_no = shard.first_line
        position = shard.start
        if shard.start > 0:
            handle.seek(shard.start - 1)
            if handle.read(1) != b"\n":  # the line in progress belongs to the previous range
                position += len(handle.readline())
                line_no += 1
        end = shard.end if shard.end >= 0 else math.inf
        while position < end:
            raw = handle.readline()
            if not raw:
                break
            yield line_no, raw
            position += len(raw)
            line_no += 1


def _parquet_rows(shard: Shard):
    import pyarrow.parquet as pq

    line_no = 0
    for batch in pq.ParquetFile(shard.path).iter_batches(batch_size=8192):
        for obj in batch.to_pylist():
            line_no += 1
            yield line_no, obj


def _parse(kind: str, line_no: int, value: Any) -> tuple | None:
    """One row's values in `READ_SCHEMAS` order (ids and payload), None for a line to pass over."""
    if kind in ("corpus", "queries"):
        row_id, title, text, _ = parse_record(value, kind)  # type: ignore[arg-type]
        return (row_id, document_text(title, text)) if kind == "corpus" else (row_id, text)
    if kind == "qrels":
        return parse_qrel(value, line_no)
    return parse_run_line(value)


def read_shard(shard: Shard) -> tuple[pa.Table, list[dict[str, Any]]]:
    """Read and validate one shard: its good rows (``READ_SCHEMAS[kind]``) and its bad rows as dicts (``file``:
    the file's index, ``line``, ``field``, ``reason``, ``raw``)."""
    schema = READ_SCHEMAS[shard.kind]
    columns: list[list] = [[] for _ in schema.names]
    has_raw = "raw" in schema.names
    bad: list[dict[str, Any]] = []

    def keep(values: tuple, line_no: int, raw: str | None) -> None:
        row = (*values, *([raw] if has_raw else []), shard.file_index, line_no)
        for column, value in zip(columns, row):
            column.append(value)

    def reject(line_no: int, err: RowError, raw: str) -> None:
        bad.append(
            {"file": shard.file_index, "line": line_no, "field": err.field, "reason": err.reason, "raw": raw}
        )

    if shard.fmt == "parquet":
        for line_no, obj in _parquet_rows(shard):
            try:
                keep(_parse(shard.kind, line_no, obj), line_no, None)  # type: ignore[arg-type]
            except RowError as err:
                reject(line_no, err, json.dumps(obj, default=str, ensure_ascii=False)[:_RAW_CHARS])
    else:
        for line_no, raw_bytes in _shard_lines(shard):
            text = None
            try:
                text = decode_line(raw_bytes, line_no)
                if not text.strip():
                    continue
                value = parse_json_line(text) if shard.kind in ("corpus", "queries") else text
                values = _parse(shard.kind, line_no, value)
                if values is not None:
                    keep(values, line_no, text.rstrip("\n")[:_RAW_CHARS] if has_raw else None)
            except RowError as err:
                raw = text if text is not None else raw_text(raw_bytes)
                reject(line_no, err, raw.rstrip("\n")[:_RAW_CHARS])
    return pa.table(columns, schema=schema), bad


# The id columns each kind is checked by: (namespace, column). A namespace's ids are defined by one kind (documents
# by the corpus, queries by the queries file) and referenced by the qrels.
_KEYS: dict[str, list[tuple[str, str]]] = {
    "corpus": [("doc", "doc_id")],
    "queries": [("query", "query_id")],
    "qrels": [("doc", "doc_id"), ("query", "query_id")],
    "run": [],
}
_DEFINES = {"doc": "corpus", "query": "queries"}


def _split_by_hash(table: pa.Table, buckets: int) -> list[pa.Table]:
    """``table`` (first column ``id``) cut into ``buckets`` parts by a stable hash of the id."""
    where = np.fromiter(
        (zlib.crc32(i.encode()) % buckets for i in table.column("id").to_pylist()), np.int64, len(table)
    )
    order = np.argsort(where, kind="stable")
    table, where = table.take(pa.array(order)), where[order]
    bounds = np.searchsorted(where, np.arange(buckets + 1))
    return [table.slice(bounds[b], bounds[b + 1] - bounds[b]) for b in range(buckets)]


def _read_task(shard: Shard, buckets: int) -> tuple:
    """A read task: the shard's good rows, ``{"rows", "bad"}``, then its ids cut into hash buckets per namespace."""
    table, bad = read_shard(shard)
    parts: list[pa.Table] = []
    for _, key in _KEYS[shard.kind]:
        columns = [key, "_file", "_line"] + (["raw"] if shard.kind == "qrels" else [])
        parts += _split_by_hash(table.select(columns).rename_columns(["id", *columns[1:]]), buckets)
    return (table, {"rows": len(table), "bad": bad}, *parts)


def _check_bucket(n_defining: int, *tables: pa.Table) -> tuple[dict[str, Any], pa.Array]:
    """One hash bucket of a namespace: ``tables[:n_defining]`` hold its ids (``id``, ``_file``, ``_line``), the rest
    the qrels' references to them (with ``raw``). Returns the duplicated ids' occurrences in file order, the
    references to unknown ids, and (a second output) the referenced ids that exist."""
    ids = pa.concat_tables(tables[:n_defining])
    counts = ids.group_by("id").aggregate([("id", "count")])
    repeated = counts.filter(pc.greater(counts.column("id_count"), 1)).column("id")
    occurrences = ids.filter(pc.is_in(ids.column("id"), repeated)).sort_by(
        [("id", "ascending"), ("_file", "ascending"), ("_line", "ascending")]
    )
    found: dict[str, Any] = {"duplicates": occurrences.to_pylist(), "unknown": [], "referenced": 0}
    referenced = pa.array([], pa.string())
    if len(tables) > n_defining:
        refs = pa.concat_tables(tables[n_defining:])
        known = pc.is_in(refs.column("id"), ids.column("id"))
        found["unknown"] = refs.filter(pc.invert(known)).to_pylist()
        referenced = pc.unique(refs.filter(known).column("id"))
        found["referenced"] = len(referenced)
    return found, referenced


def _filter_table(table: pa.Table, key: str, drop: pa.Array, *keep_ids: pa.Array) -> pa.Table:
    """``table`` without the rows at ``drop`` (``"file:line"`` strings) and, when ``keep_ids`` are given, only the
    rows whose ``key`` is among them."""
    if len(drop):
        where = pc.binary_join_element_wise(
            pc.cast(table.column("_file"), pa.string()), pc.cast(table.column("_line"), pa.string()), ":"
        )
        table = table.filter(pc.invert(pc.is_in(where, drop)))
    if keep_ids:
        table = table.filter(pc.is_in(table.column(key), pa.concat_arrays(list(keep_ids))))
    return table


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


class _Rejects:
    """Rejected rows of several kinds of file, raised or returned in file order."""

    def __init__(self, on_bad_row: OnBadRow, files: dict[str, list[Path]], hint: bool = True):
        self.policy = _Validator(on_bad_row, hint)  # the policy check and the error of the in-process reader
        self.files = files
        self.rows: list[tuple[int, int, int, BadRow]] = []

    def add(self, kind: str, file_index: int, line: int, field_name: str, reason: str, raw: str) -> None:
        path = str(self.files[kind][file_index])
        order = list(self.files).index(kind)
        self.rows.append((order, file_index, line, BadRow(path, line, field_name, reason, raw)))

    def check(self) -> list[BadRow]:
        """Raise the first rejected row in file order (``fail``), or return them all in that order (``skip``)."""
        self.rows.sort(key=lambda row: row[:3])
        if self.rows and self.policy.on_bad_row == "fail":
            self.policy.fail(self.rows[0][3])
        return [row[3] for row in self.rows]


def _partitions(rows: int) -> int:
    return max(1, math.ceil(rows / ROWS_PER_PARTITION))


def _buckets(files: dict[str, list[Path]]) -> int:
    """Hash buckets for the id checks: one per GiB of input, so that one bucket's ids fit a task easily."""
    size = sum(p.stat().st_size for paths in files.values() for p in paths)
    return max(1, math.ceil(size / (1 << 30)))


def _read_checked(
    files: dict[str, list[Path]], on_bad_row: OnBadRow, cpus: float, split: bool
) -> tuple[dict[str, list], dict[str, int], list[BadRow]]:
    """Read every file in Ray tasks, check ids across them, and drop what is rejected; returns the table refs per
    kind, the row counts, and the rejected rows (or raises the first with ``on_bad_row="fail"``)."""
    import ray

    rejects = _Rejects(on_bad_row, files)
    buckets = _buckets(files)
    tables: dict[str, list] = {}
    parts: dict[tuple[str, str], list[list]] = {}  # (namespace, kind) -> per shard, its bucket refs
    infos: dict[str, list] = {}
    for kind, paths in files.items():
        keys = _KEYS[kind]
        task = ray.remote(_read_task).options(num_returns=2 + len(keys) * buckets, num_cpus=cpus)
        tables[kind], infos[kind] = [], []
        for shard in plan_shards(kind, paths):  # type: ignore[arg-type]
            table, info, *bucket_refs = task.remote(shard, buckets)
            tables[kind].append(table)
            infos[kind].append(info)
            for i, (namespace, _) in enumerate(keys):
                parts.setdefault((namespace, kind), []).append(bucket_refs[i * buckets : (i + 1) * buckets])
    counts: dict[str, int] = {}
    for kind in files:
        counts[kind] = 0
        for info in ray.get(infos[kind]):
            counts[kind] += info["rows"]
            for bad in info["bad"]:
                rejects.add(kind, bad["file"], bad["line"], bad["field"], bad["reason"], bad["raw"])
    rejects.check()  # the first bad row stops a "fail" read before the id checks

    check = ray.remote(_check_bucket).options(num_returns=2, num_cpus=cpus)
    drop: dict[str, set[str]] = {kind: set() for kind in files}
    referenced: dict[str, list] = {}
    unknown: dict[str, dict[int, list]] = {}  # qrels line -> unknown references (query namespace first)
    for namespace in ("query", "doc"):
        kind = _DEFINES[namespace]
        if kind not in files:
            continue
        defining = parts[(namespace, kind)]
        references = parts.get((namespace, "qrels"), [])
        results = [
            check.remote(len(defining), *[s[b] for s in defining], *[s[b] for s in references])
            for b in range(buckets)
        ]
        referenced[namespace] = [ref for _, ref in results]
        for found in ray.get([info for info, _ in results]):
            first: dict[str, dict] = {}
            for row in found["duplicates"]:
                if row["id"] not in first:
                    first[row["id"]] = row
                    continue
                where = first[row["id"]]
                reason = (
                    duplicate_reason(row["id"], where["_line"])
                    if where["_file"] == row["_file"]
                    else f"duplicate id {row['id']!r} (first at {files[kind][where['_file']]}:{where['_line']})"
                )
                raw = json.dumps({"_id": row["id"]}, ensure_ascii=False)
                rejects.add(kind, row["_file"], row["_line"], "_id", reason, raw)
                drop[kind].add(f"{row['_file']}:{row['_line']}")
            for row in found["unknown"]:
                unknown.setdefault((row["_file"], row["_line"]), []).append((namespace, row))
    for (file_index, line), found in sorted(unknown.items()):
        namespace, row = found[0]  # a line with both ids unknown is rejected for its query, as `beir` does
        field_name, what = ("query-id", "query") if namespace == "query" else ("corpus-id", "document")
        rejects.add("qrels", file_index, line, field_name, f"unknown {what} {row['id']!r}", row["raw"])
        drop["qrels"].add(f"{file_index}:{line}")
    bad = rejects.check()

    filter_task = ray.remote(_filter_table).options(num_cpus=cpus)
    for kind in files:
        judged = referenced["query"] if kind == "queries" and split else []
        if drop[kind] or judged:
            key = "query_id" if kind in ("queries", "qrels") else "doc_id"
            dropped = pa.array(sorted(drop[kind]), pa.string())
            tables[kind] = [filter_task.remote(t, key, dropped, *judged) for t in tables[kind]]
        counts[kind] -= len(drop[kind])
    return tables, counts, bad


def read_corpus_dataset(root: str | Path, on_bad_row: OnBadRow = "fail", cpus: float = 1.0):
    """The corpus of a BEIR folder as a Dataset (``doc_id``, ``doc_text``: title, newline, text), validated and
    without duplicate ids; returns ``(dataset, documents, rejects)``."""
    import ray.data

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    tables, counts, bad = _read_checked(
        {"corpus": input_files(root, "corpus")}, on_bad_row, cpus, split=False
    )
    corpus = ray.data.from_arrow_refs(tables["corpus"]).select_columns(["doc_id", "doc_text"])
    return corpus, counts["corpus"], bad


def read_beir_dataset(
    root: str | Path, split: str | None = None, on_bad_row: OnBadRow = "fail", cpus: float = 1.0
) -> BeirDatasets:
    """Read and validate a BEIR folder in Ray tasks (the rules and messages of `beir.read_beir`); with ``split``,
    keep the queries that ``qrels/<split>.tsv`` names."""
    import ray.data

    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    files = {"corpus": input_files(root, "corpus"), "queries": input_files(root, "queries")}
    if split is not None:
        files["qrels"] = [qrels_file(root, split)]
    tables, counts, bad = _read_checked(files, on_bad_row, cpus, split=split is not None)
    corpus = ray.data.from_arrow_refs(tables["corpus"]).select_columns(["doc_id", "doc_text"])
    queries = ray.data.from_arrow_refs(tables["queries"]).select_columns(["query_id", "query_text"])
    qrels = None
    if split is not None:
        qrels = ray.data.from_arrow_refs(tables["qrels"]).select_columns(["query_id", "doc_id", "grade"])
    out = {"documents": counts["corpus"], "queries": queries.count()}
    if qrels is not None:
        out["qrels"] = counts["qrels"]
    return BeirDatasets(root, split, corpus, queries, qrels, out, bad)


def _hash_key(seed: int, query_id: str) -> int:
    return (
        int.from_bytes(hashlib.blake2b(f"{seed}:{query_id}".encode(), digest_size=8).digest(), "little") >> 1
    )


def sample_queries(queries, max_queries: int | None, seed: int = 0):
    """``max_queries`` of the queries, chosen by a seeded hash of their ids (the driver holds one integer per
    query); all of them when ``max_queries`` is None or not smaller."""
    if max_queries is None or max_queries >= queries.count():
        return queries

    def keyed(batch: pa.Table) -> pa.Table:
        keys = [_hash_key(seed, qid) for qid in batch.column("query_id").to_pylist()]
        return batch.append_column("_key", pa.array(keys, pa.int64()))

    with_keys = queries.map_batches(keyed, batch_format="pyarrow").materialize()
    keys = np.concatenate(
        [b["_key"] for b in with_keys.select_columns(["_key"]).iter_batches(batch_format="numpy")]
    )
    threshold = int(np.partition(keys, max_queries - 1)[max_queries - 1])
    chosen = with_keys.map_batches(
        lambda b: b.filter(pc.less_equal(b.column("_key"), threshold)), batch_format="pyarrow"
    )
    return chosen.select_columns(["query_id", "query_text"]).materialize()


def run_pairs(
    beir: BeirDatasets,
    run: str | Path,
    training: bool = False,
    max_queries: int | None = None,
    seed: int = 0,
    cpus: float = 1.0,
    min_partitions: int = 1,
):
    """Candidate pairs of a TREC run (a file or a folder of shards), joined in Ray Data; returns
    ``(dataset, counts)``.

    The dataset holds `PAIR_SCHEMA` rows for the run's documents of each (selected) query, a document once per
    query (its best rank). In training mode the qrel positives a run misses are added, and each block holds whole
    candidate lists in rank order (a group-by over the queries); otherwise blocks are grouped by document, which is
    what the teacher's prefix sharing wants. ``label`` is the qrel grade, 0 for an unjudged document of a judged
    query, -1 without qrels. A bad run line, or one naming a document not in the corpus, is a `DataError` naming it.
    Joins and the group-by use about one partition per `ROWS_PER_PARTITION` references, at least
    ``min_partitions`` (so that small runs still spread over several teacher actors).
    """
    import ray.data

    run = Path(run)
    files = {"run": sorted(p for p in run.iterdir() if p.is_file()) if run.is_dir() else [run]}
    if not files["run"]:
        raise DataError(f"{run}: an empty run folder")
    tables, counts, _ = _read_checked(files, "fail", cpus, split=False)
    refs = ray.data.from_arrow_refs(tables["run"])
    return join_pairs(beir, refs, counts["run"], training, max_queries, seed, min_partitions, files["run"])


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
    """`run_pairs` of ``n`` references already in a Dataset (``refs``: `REF_SCHEMA` rows; ``_file`` indexes
    ``files`` and ``_line`` is the line there, for errors; a retrieval's own references carry -1 and 0)."""
    queries = sample_queries(beir.queries, max_queries, seed)
    if training and beir.qrels is not None:
        refs = refs.union(beir.qrels.map_batches(_positive_refs, batch_format="pyarrow"))
        n += beir.counts["qrels"]
    parts = max(min_partitions, _partitions(n))
    if beir.qrels is not None:
        refs = refs.join(beir.qrels, "left_outer", parts, on=("query_id", "doc_id"))
    joined = (
        refs.join(queries, "inner", parts, on=("query_id",))
        .join(beir.corpus, "left_outer", parts, on=("doc_id",))
        .map_batches(_finish_pairs, fn_kwargs={"judged": beir.qrels is not None}, batch_format="pyarrow")
        .materialize()
    )
    missing = joined.map_batches(
        lambda b: b.filter(pc.is_null(b.column("doc_text"))), batch_format="pyarrow"
    ).take(1)
    if missing:
        row = missing[0]
        where = f"{files[row['_file']]}:{row['_line']}" if 0 <= row["_file"] < len(files) else "a reference"
        raise DataError(f"{where}: field 'docid': unknown document {row['doc_id']!r}")
    if training:
        pairs = joined.groupby("query_id", num_partitions=parts).map_groups(
            _rank_order, batch_format="pyarrow"
        )
    else:
        pairs = joined.map_batches(_pair_columns, batch_format="pyarrow")
    pairs = pairs.materialize()
    return pairs, {"pairs": pairs.count(), "queries": queries.count()}


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


def _positive_refs(batch: pa.Table) -> pa.Table:
    """Qrel positives (grade > 0) as run references ranked after every run document."""
    batch = batch.filter(pc.greater(batch.column("grade"), 0))
    return references(batch.column("query_id"), batch.column("doc_id"), pa.array([math.inf] * len(batch)))


def _finish_pairs(batch: pa.Table, judged: bool) -> pa.Table:
    """Joined references to pairs: labels from the grades, and a (query, document) seen twice kept at its best
    rank (both copies share a join partition, which is by document). An unknown document keeps a null text."""
    grades = batch.column("grade").to_pylist() if "grade" in batch.column_names else [None] * len(batch)
    default = 0 if judged else -1
    table = pa.table(
        {
            "query_id": batch.column("query_id"),
            "doc_id": batch.column("doc_id"),
            "label": pa.array([default if g is None else g for g in grades], pa.int8()),
            "query_text": batch.column("query_text"),
            "doc_text": batch.column("doc_text"),
            "rank": batch.column("rank"),
            "_file": batch.column("_file"),
            "_line": batch.column("_line"),
        }
    )
    table = table.sort_by([("doc_id", "ascending"), ("query_id", "ascending"), ("rank", "ascending")])
    keys = list(zip(table.column("query_id").to_pylist(), table.column("doc_id").to_pylist()))
    first = [i == 0 or keys[i] != keys[i - 1] for i in range(len(keys))]
    return table.filter(pa.array(first, pa.bool_()))


def _rank_order(group: pa.Table) -> pa.Table:
    """One query's candidates in rank order (ties by document id), in `PAIR_SCHEMA`."""
    return _pair_columns(group.sort_by([("rank", "ascending"), ("doc_id", "ascending")]))


def _pair_columns(batch: pa.Table) -> pa.Table:
    return batch.select(PAIR_SCHEMA.names).cast(PAIR_SCHEMA)


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
    the pair does.
    """
    import ray

    data = read_beir_dataset(root, split, on_bad_row=on_bad_row)
    chosen = sample_queries(data.queries, max_queries, seed)
    pairs, _ = run_pairs(replace(data, queries=chosen), run)
    table = pa.concat_tables([ray.get(ref) for ref in pairs.to_arrow_refs()]).cast(PAIR_SCHEMA)
    table = table.sort_by([("query_id", "ascending"), ("doc_id", "ascending")])
    selected = chosen.take_all()
    wanted = pa.array([row["query_id"] for row in selected], pa.string())
    judged = data.qrels.map_batches(
        lambda b: b.filter(pc.is_in(b.column("query_id"), wanted)), batch_format="pyarrow"
    ).take_all()
    qrels: dict[str, dict[str, int]] = {}
    for row in judged:
        qrels.setdefault(row["query_id"], {})[row["doc_id"]] = row["grade"]
    selected.sort(key=lambda row: row["query_id"])
    queries = {row["query_id"]: Query(row["query_text"]) for row in selected}
    corpus: dict[str, Document] = {}
    for did, dtext in zip(table.column("doc_id").to_pylist(), table.column("doc_text").to_pylist()):
        corpus.setdefault(did, Document("", dtext))
    return BeirData(Path(root), split, corpus, queries, qrels, data.rejects), table
