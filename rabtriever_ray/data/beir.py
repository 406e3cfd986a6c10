"""Validated readers for BEIR-layout folders.

A BEIR folder holds ``corpus.jsonl`` (``_id``, ``title``, ``text``, optional ``metadata``), ``queries.jsonl``
(``_id``, ``text``, optional ``metadata``) and ``qrels/<split>.tsv`` (header ``query-id corpus-id score``); each
JSONL file may also be gzipped (``.jsonl.gz``). Files are UTF-8, with or without a byte-order mark, with LF or
CRLF line endings (as editors on Windows save them); neither reaches an id, a text or a score.

Every row is checked: malformed JSON, a row that is not an object, a missing or non-string ``_id`` / ``text``,
an empty query text, a document with neither title nor text, a non-object ``metadata``, a duplicate id, a
malformed qrel line, a qrel naming an unknown query or document, and a line that is not UTF-8 (field
``<encoding>``). With ``on_bad_row="fail"`` (the default) the first bad row stops the read with a `DataError`
naming file, line and field. With ``"skip"`` the row is left out and recorded in ``BeirData.rejects`` (file,
line, field, reason, raw text with any byte that is not UTF-8 written as ``\\x8a``); `write_rejects` writes
them as JSONL. Nothing is dropped silently.

`read_beir` returns plain Python (`BeirData`) for in-process use; `corpus_dataset` / `queries_dataset` turn it
into Ray Datasets.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

OnBadRow = Literal["fail", "skip"]
QRELS_HEADER = ("query-id", "corpus-id", "score")


class DataError(ValueError):
    """A bad row or file; the message names the file, the line and the field."""


@dataclass
class BadRow:
    file: str
    line: int
    field: str
    reason: str
    raw: str

    def message(self) -> str:
        return f"{self.file}:{self.line}: field {self.field!r}: {self.reason}"


@dataclass
class Document:
    title: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Query:
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


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
        counts: dict[str, int] = {}
        for bad in self.rejects:
            name = Path(bad.file).name
            counts[name] = counts.get(name, 0) + 1
        return counts


class _Validator:
    def __init__(self, on_bad_row: OnBadRow):
        if on_bad_row not in ("fail", "skip"):
            raise ValueError(f"on_bad_row must be 'fail' or 'skip', got {on_bad_row!r}")
        self.on_bad_row = on_bad_row
        self.rejects: list[BadRow] = []

    def bad(self, path: Path, line: int, field_name: str, reason: str, raw: str) -> None:
        row = BadRow(str(path), line, field_name, reason, raw.rstrip("\n")[:2000])
        if self.on_bad_row == "fail":
            raise DataError(row.message() + " (use on_bad_row='skip' to write it to rejects.jsonl and go on)")
        self.rejects.append(row)


def find_file(root: Path, stem: str) -> Path:
    """``root/stem.jsonl`` or ``root/stem.jsonl.gz``."""
    for candidate in (root / f"{stem}.jsonl", root / f"{stem}.jsonl.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root}: no {stem}.jsonl or {stem}.jsonl.gz (is this a BEIR folder?)")


def _lines(path: Path, check: _Validator) -> Iterator[tuple[int, str]]:
    """Numbered (from 1) text lines of ``path`` (gzipped if ``.gz``); a line that is not UTF-8 is a bad row.

    ``utf-8-sig`` drops a leading byte-order mark and universal newlines turn CRLF into ``"\\n"``. Undecodable
    bytes are read as surrogate escapes rather than failing the whole read, because the codec's own error names
    neither the file nor the line (its position counts from the start of a read-ahead chunk); such a line goes
    to ``check`` like any other bad row, with the codec's reason and the byte's place in the line.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8-sig", errors="surrogateescape") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.isascii():  # only a non-ASCII line can hold an escaped byte
                raw = line.encode("utf-8", "surrogateescape")  # the bytes read (CRLF as LF)
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    where = f"byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line"
                    check.bad(
                        path,
                        line_no,
                        "<encoding>",
                        f"not UTF-8: {where} ({err.reason})",
                        raw.decode("utf-8", "backslashreplace"),
                    )
                    continue
            yield line_no, line


def _read_jsonl(
    path: Path, kind: Literal["corpus", "queries"], check: _Validator
) -> dict[str, Document | Query]:
    rows: dict[str, Document | Query] = {}
    first_line: dict[str, int] = {}
    for line_no, raw in _lines(path, check):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as err:
            check.bad(path, line_no, "<json>", f"malformed JSON: {err.msg} at column {err.colno}", raw)
            continue
        if not isinstance(obj, dict):
            check.bad(path, line_no, "<json>", f"expected a JSON object, got {type(obj).__name__}", raw)
            continue
        row_id = obj.get("_id")
        if isinstance(row_id, int) and not isinstance(row_id, bool):
            row_id = str(row_id)
        if not isinstance(row_id, str) or not row_id.strip():
            check.bad(path, line_no, "_id", "missing or not a non-empty string", raw)
            continue
        text, title = obj.get("text"), obj.get("title", "")
        if not isinstance(text, str):
            check.bad(path, line_no, "text", "missing or not a string", raw)
            continue
        if title is None:
            title = ""
        if not isinstance(title, str):
            check.bad(path, line_no, "title", "not a string", raw)
            continue
        if kind == "queries" and not text.strip():
            check.bad(path, line_no, "text", "empty query text", raw)
            continue
        if kind == "corpus" and not text.strip() and not title.strip():
            check.bad(path, line_no, "text", "empty document (no text and no title)", raw)
            continue
        metadata = obj.get("metadata") or {}
        if not isinstance(metadata, dict):
            check.bad(path, line_no, "metadata", "not a JSON object", raw)
            continue
        if row_id in rows:
            check.bad(
                path, line_no, "_id", f"duplicate id {row_id!r} (first on line {first_line[row_id]})", raw
            )
            continue
        first_line[row_id] = line_no
        rows[row_id] = Document(title, text, metadata) if kind == "corpus" else Query(text, metadata)
    return rows


def read_corpus(path: str | Path, on_bad_row: OnBadRow = "fail") -> tuple[dict[str, Document], list[BadRow]]:
    check = _Validator(on_bad_row)
    return _read_jsonl(Path(path), "corpus", check), check.rejects


def read_queries(path: str | Path, on_bad_row: OnBadRow = "fail") -> tuple[dict[str, Query], list[BadRow]]:
    check = _Validator(on_bad_row)
    return _read_jsonl(Path(path), "queries", check), check.rejects


def _read_qrels(path: Path, queries: dict, corpus: dict, check: _Validator) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for line_no, raw in _lines(path, check):
        if not raw.strip():
            continue
        parts = raw.rstrip("\n").split("\t")
        if line_no == 1:
            if tuple(p.strip() for p in parts) != QRELS_HEADER:
                check.bad(
                    path, 1, "<header>", f"expected header {' '.join(QRELS_HEADER)!r} (tab-separated)", raw
                )
            continue
        if len(parts) != 3:
            check.bad(path, line_no, "<row>", f"expected 3 tab-separated fields, got {len(parts)}", raw)
            continue
        query_id, doc_id, score = (p.strip() for p in parts)
        try:
            grade = int(score)
        except ValueError:
            check.bad(path, line_no, "score", f"not an integer: {score!r}", raw)
            continue
        if query_id not in queries:
            check.bad(path, line_no, "query-id", f"unknown query {query_id!r}", raw)
            continue
        if doc_id not in corpus:
            check.bad(path, line_no, "corpus-id", f"unknown document {doc_id!r}", raw)
            continue
        qrels.setdefault(query_id, {})[doc_id] = grade
    return qrels


def read_beir(root: str | Path, split: str | None = None, on_bad_row: OnBadRow = "fail") -> BeirData:
    """Read and validate a BEIR folder; with ``split``, keep the queries that ``qrels/<split>.tsv`` names."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    check = _Validator(on_bad_row)
    corpus = _read_jsonl(find_file(root, "corpus"), "corpus", check)
    queries = _read_jsonl(find_file(root, "queries"), "queries", check)
    qrels: dict[str, dict[str, int]] = {}
    if split is not None:
        path = root / "qrels" / f"{split}.tsv"
        if not path.is_file():
            available = (
                sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
            )
            raise DataError(
                f"{root}: no qrels for split {split!r} at {path} (available: {available or 'none'})"
            )
        qrels = _read_qrels(path, queries, corpus, check)
        queries = {qid: queries[qid] for qid in queries if qid in qrels}
    return BeirData(root, split, corpus, queries, qrels, check.rejects)  # type: ignore[arg-type]


def write_rejects(rejects: list[BadRow], path: str | Path) -> None:
    """Write rejected rows as JSONL (``file``, ``line``, ``field``, ``reason``, ``raw``)."""
    with open(path, "w", encoding="utf-8") as handle:
        for bad in rejects:
            handle.write(json.dumps(asdict(bad)) + "\n")


def corpus_dataset(data: BeirData):
    """The corpus as a Ray Dataset with columns ``doc_id``, ``title``, ``text``."""
    import ray.data

    return ray.data.from_items(
        [{"doc_id": doc_id, "title": doc.title, "text": doc.text} for doc_id, doc in data.corpus.items()]
    )


def queries_dataset(data: BeirData):
    """The (split's) queries as a Ray Dataset with columns ``query_id``, ``text``."""
    import ray.data

    return ray.data.from_items([{"query_id": qid, "text": q.text} for qid, q in data.queries.items()])
