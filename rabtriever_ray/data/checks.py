"""Reading a BEIR folder's files with their checks across files: `read_checked`.

Each shard is read and validated by one task (`files.read_shard`), which also hashes its ids into buckets (one per
GiB of input); one task per bucket then finds duplicate ids (the first in file and line order is kept; a later one
is rejected, naming where the first is), qrels naming an unknown query or document, and qrels lines that judge a
(query, document) pair judged before with another grade (the first is kept; a repeat with the same grade is
dropped quietly). The caller receives table
references, row counts and the rejected rows: with ``on_bad_row="fail"`` the first in file order is raised as a
`DataError`; with ``"skip"`` they are returned for ``rejects.jsonl``, and filter tasks drop them. The same tasks
run in Ray (`tasks.RayTasks`) or in this process (`tasks.LocalTasks`), so both readers give the same rows and the
same messages.
"""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .files import RANGE_BYTES, Shard, plan_shards, read_shard
from .rows import BadRow, BadRowPolicy, OnBadRow, duplicate_reason

# The id columns each kind is checked by: (namespace, column). A namespace's ids are defined by one kind (documents
# by the corpus, queries by the queries file, judged pairs by the qrels) and referenced by the qrels.
KEYS: dict[str, list[tuple[str, str]]] = {
    "corpus": [("doc", "doc_id")],
    "queries": [("query", "query_id")],
    "qrels": [("doc", "doc_id"), ("query", "query_id"), ("judgement", "pair")],
    "run": [("query", "query_id")],  # checked when the queries are read with the run (`candidates.read_run`)
}
REFERRERS = ("qrels", "run")  # the kinds whose ids must name a defined id (one of them per read)
DEFINES = {"doc": "corpus", "query": "queries", "judgement": "qrels"}


def split_by_hash(table: pa.Table, buckets: int) -> list[pa.Table]:
    """``table`` (first column ``id``) cut into ``buckets`` parts by a stable hash of the id."""
    where = np.fromiter(
        (zlib.crc32(i.encode()) % buckets for i in table.column("id").to_pylist()), np.int64, len(table)
    )
    order = np.argsort(where, kind="stable")
    table, where = table.take(pa.array(order)), where[order]
    bounds = np.searchsorted(where, np.arange(buckets + 1))
    return [table.slice(bounds[b], bounds[b + 1] - bounds[b]) for b in range(buckets)]


def read_task(shard: Shard, buckets: int) -> tuple:
    """A read task: the shard's good rows, ``{"rows", "bad"}``, then its ids cut into hash buckets per namespace."""
    table, bad = read_shard(shard)
    parts: list[pa.Table] = []
    for namespace, key in KEYS[shard.kind]:
        if namespace == "judgement":  # the pair as one id: query and document ids joined by a tab
            pair = pc.binary_join_element_wise(table.column("query_id"), table.column("doc_id"), "\t")
            ids = pa.table({"id": pair, **{name: table.column(name) for name in ("grade", "_file", "_line", "raw")}})
        else:
            columns = [key, "_file", "_line"] + (["raw"] if shard.kind == "qrels" else [])
            ids = table.select(columns).rename_columns(["id", *columns[1:]])
            if shard.kind == "run":  # a run keeps no raw line
                ids = ids.append_column("raw", pa.nulls(len(ids), pa.string()))
        parts += split_by_hash(ids, buckets)
    return (table, {"rows": len(table), "bad": bad}, *parts)


def check_bucket(n_defining: int, *tables: pa.Table) -> tuple[dict[str, Any], pa.Array]:
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


def filter_table(table: pa.Table, key: str, drop: pa.Array, *keep_ids: pa.Array) -> pa.Table:
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


class Rejects:
    """Rejected rows of several kinds of file, raised or returned in file order."""

    def __init__(self, on_bad_row: OnBadRow, files: dict[str, list[Path]], hint: bool = True):
        self.policy = BadRowPolicy(on_bad_row, hint)
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


def _buckets(files: dict[str, list[Path]]) -> int:
    """Hash buckets for the id checks: one per GiB of input, so that one bucket's ids fit a task easily."""
    size = sum(p.stat().st_size for paths in files.values() for p in paths)
    return max(1, math.ceil(size / (1 << 30)))


def read_checked(
    files: dict[str, list[Path]],
    on_bad_row: OnBadRow,
    tasks,
    cpus: float = 1.0,
    split: bool = False,
    hint: bool = True,
) -> tuple[dict[str, list], dict[str, int], list[BadRow]]:
    """Read every file as ``tasks`` (`tasks.RayTasks` or `tasks.LocalTasks`), check ids across them, and drop what
    is rejected; returns the table references per kind (in file order), the row counts, and the rejected rows (or
    raises the first with ``on_bad_row="fail"``, its message ending with the ``skip`` hint when ``hint``). With
    ``split``, only the queries the qrels judge are kept."""
    rejects = Rejects(on_bad_row, files, hint)
    buckets = _buckets(files) if tasks.in_ray else 1
    tables: dict[str, list] = {}
    parts: dict[tuple[str, str], list[list]] = {}  # (namespace, kind) -> per shard, its bucket refs
    infos: dict[str, list] = {}
    for kind, paths in files.items():
        keys = KEYS[kind]
        tables[kind], infos[kind] = [], []
        for shard in plan_shards(kind, paths, tasks, RANGE_BYTES if tasks.in_ray else None):  # type: ignore[arg-type]
            table, info, *bucket_refs = tasks.submit(
                read_task, shard, buckets, returns=2 + len(keys) * buckets, cpus=cpus
            )
            tables[kind].append(table)
            infos[kind].append(info)
            for i, (namespace, _) in enumerate(keys):
                parts.setdefault((namespace, kind), []).append(bucket_refs[i * buckets : (i + 1) * buckets])
    counts: dict[str, int] = {}
    for kind in files:
        counts[kind] = 0
        for info in tasks.get(infos[kind]):
            counts[kind] += info["rows"]
            for bad in info["bad"]:
                rejects.add(kind, bad["file"], bad["line"], bad["field"], bad["reason"], bad["raw"])
    rejects.check()  # the first bad row stops a "fail" read before the id checks

    drop: dict[str, set[str]] = {kind: set() for kind in files}
    referenced: dict[str, list] = {}
    unknown: dict[tuple[str, int, int], list] = {}  # (kind, file, line) -> unknown references (query ones first)
    for namespace in ("query", "doc", "judgement"):
        kind = DEFINES[namespace]
        if kind not in files:
            continue
        defining = parts[(namespace, kind)]
        referrer = next((k for k in REFERRERS if (namespace, k) in parts), "qrels")
        references = parts.get((namespace, referrer), [])
        results = [
            tasks.submit(
                check_bucket,
                len(defining),
                *[s[b] for s in defining],
                *[s[b] for s in references],
                returns=2,
                cpus=cpus,
            )
            for b in range(buckets)
        ]
        referenced[namespace] = [ref for _, ref in results]
        for found in tasks.get([info for info, _ in results]):
            first: dict[str, dict] = {}
            for row in found["duplicates"]:
                if row["id"] not in first:
                    first[row["id"]] = row
                    continue
                where = first[row["id"]]
                drop[kind].add(f"{row['_file']}:{row['_line']}")
                place = (
                    f"line {where['_line']}"
                    if where["_file"] == row["_file"]
                    else f"{files[kind][where['_file']]}:{where['_line']}"
                )
                if namespace == "judgement":
                    if row["grade"] != where["grade"]:  # the same grade twice changes nothing
                        query_id, doc_id = row["id"].split("\t", 1)
                        reason = (
                            f"query {query_id!r} and document {doc_id!r} are judged {where['grade']} on {place} "
                            f"and {row['grade']} here: keep one line per pair"
                        )
                        rejects.add(kind, row["_file"], row["_line"], "score", reason, row["raw"])
                    continue
                reason = (
                    duplicate_reason(row["id"], where["_line"])
                    if where["_file"] == row["_file"]
                    else f"duplicate id {row['id']!r} (first at {place})"
                )
                raw = json.dumps({"_id": row["id"]}, ensure_ascii=False)
                rejects.add(kind, row["_file"], row["_line"], "_id", reason, raw)
            for row in found["unknown"]:
                unknown.setdefault((referrer, row["_file"], row["_line"]), []).append((namespace, row))
    for (referrer, file_index, line), found in sorted(unknown.items()):
        namespace, row = found[0]  # a line with both ids unknown is rejected for its query
        field_name, what = ("query-id", "query") if namespace == "query" else ("corpus-id", "document")
        field_name = "qid" if referrer == "run" else field_name
        raw = row["raw"] or ""
        rejects.add(referrer, file_index, line, field_name, f"unknown {what} {row['id']!r}", raw)
        drop[referrer].add(f"{file_index}:{line}")
    bad = rejects.check()

    for kind in files:
        judged = referenced["query"] if kind == "queries" and split else []
        if drop[kind] or judged:
            key = "query_id" if kind in ("queries", "qrels") else "doc_id"
            dropped = pa.array(sorted(drop[kind]), pa.string())
            tables[kind] = [
                tasks.submit(filter_table, t, key, dropped, *judged, cpus=cpus) for t in tables[kind]
            ]
        counts[kind] -= len(drop[kind])
    return tables, counts, bad
