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


def reject_counts(rejects: list[BadRow]) -> dict[str, int]:
    """Rejected rows per file name."""
    counts: dict[str, int] = {}
    for bad in rejects:
        name = Path(bad.file).name
        counts[name] = counts.get(name, 0) + 1
    return counts


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
        return reject_counts(self.rejects)


class _Validator:
    def __init__(self, on_bad_row: OnBadRow, hint: bool = True):
        if on_bad_row not in ("fail", "skip"):
            raise ValueError(f"on_bad_row must be 'fail' or 'skip', got {on_bad_row!r}")
        self.on_bad_row = on_bad_row
        self.rejects: list[BadRow] = []
        self.hint = hint  # whether on_bad_row='skip' is an option for this file

    def bad(self, path: Path, line: int, field_name: str, reason: str, raw: str) -> None:
        row = BadRow(str(path), line, field_name, reason, raw.rstrip("\n")[:2000])
        if self.on_bad_row == "fail":
            self.fail(row)
        self.rejects.append(row)

    def fail(self, row: BadRow) -> None:
        """Raise ``row`` as the `DataError` that stops a ``fail`` read."""
        hint = " (use on_bad_row='skip' to write it to rejects.jsonl and go on)" if self.hint else ""
        raise DataError(row.message() + hint)


def find_file(root: Path, stem: str) -> Path:
    """``root/stem.jsonl`` or ``root/stem.jsonl.gz``."""
    for candidate in (root / f"{stem}.jsonl", root / f"{stem}.jsonl.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{root}: no {stem}.jsonl or {stem}.jsonl.gz (is this a BEIR folder?)")


class RowError(ValueError):
    """One row's problem: the field and the reason (`_Validator.bad` adds file, line and raw text)."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field = field_name
        self.reason = reason


BOM = b"\xef\xbb\xbf"


def decode_line(raw: bytes, line_no: int) -> str:
    """One line's bytes as text: a byte-order mark on line 1 dropped, CRLF read as LF; `RowError` (field
    ``<encoding>``) when the bytes are not UTF-8, naming the byte and its place in the line (the codec's own
    message counts from the start of a read-ahead chunk, which names neither file nor line)."""
    if line_no == 1 and raw.startswith(BOM):
        raw = raw[len(BOM) :]
    if raw.endswith(b"\r\n"):
        raw = raw[:-2] + b"\n"
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        where = f"byte 0x{raw[err.start]:02x} at byte {err.start + 1} of the line"
        raise RowError("<encoding>", f"not UTF-8: {where} ({err.reason})") from None


def raw_text(raw: bytes) -> str:
    """A line as a reject records it: any byte that is not UTF-8 written as ``\\x8a``."""
    return raw.decode("utf-8", "backslashreplace")


def _lines(path: Path, check: _Validator) -> Iterator[tuple[int, str]]:
    """Numbered (from 1) text lines of ``path`` (gzipped if ``.gz``); a line that is not UTF-8 is a bad row."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            try:
                yield line_no, decode_line(raw, line_no)
            except RowError as err:
                check.bad(path, line_no, err.field, err.reason, raw_text(raw))


def parse_record(obj: Any, kind: Literal["corpus", "queries"]) -> tuple[str, str, str, dict[str, Any]]:
    """A corpus or queries row (a parsed JSON value) as ``(id, title, text, metadata)``; `RowError` names the
    field at fault. A query's title is always ``""``."""
    if not isinstance(obj, dict):
        raise RowError("<json>", f"expected a JSON object, got {type(obj).__name__}")
    row_id = obj.get("_id")
    if isinstance(row_id, int) and not isinstance(row_id, bool):
        row_id = str(row_id)
    if not isinstance(row_id, str) or not row_id.strip():
        raise RowError("_id", "missing or not a non-empty string")
    text, title = obj.get("text"), obj.get("title", "")
    if not isinstance(text, str):
        raise RowError("text", "missing or not a string")
    if title is None:
        title = ""
    if not isinstance(title, str):
        raise RowError("title", "not a string")
    if kind == "queries" and not text.strip():
        raise RowError("text", "empty query text")
    if kind == "corpus" and not text.strip() and not title.strip():
        raise RowError("text", "empty document (no text and no title)")
    metadata = obj.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise RowError("metadata", "not a JSON object")
    return row_id, title if kind == "corpus" else "", text, metadata


def parse_json_line(raw: str) -> Any:
    """A JSONL line's value; `RowError` (field ``<json>``) when it is not JSON."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise RowError("<json>", f"malformed JSON: {err.msg} at column {err.colno}") from None


def duplicate_reason(row_id: str, first_line: int) -> str:
    return f"duplicate id {row_id!r} (first on line {first_line})"


def _read_jsonl(
    path: Path, kind: Literal["corpus", "queries"], check: _Validator
) -> dict[str, Document | Query]:
    rows: dict[str, Document | Query] = {}
    first_line: dict[str, int] = {}
    for line_no, raw in _lines(path, check):
        if not raw.strip():
            continue
        try:
            row_id, title, text, metadata = parse_record(parse_json_line(raw), kind)
        except RowError as err:
            check.bad(path, line_no, err.field, err.reason, raw)
            continue
        if row_id in rows:
            check.bad(path, line_no, "_id", duplicate_reason(row_id, first_line[row_id]), raw)
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


def parse_qrel(raw: str, line_no: int) -> tuple[str, str, int] | None:
    """A qrels line as ``(query_id, doc_id, grade)``, or None for the header (line 1, checked); `RowError`
    names the field at fault. Whether the ids exist is the caller's check."""
    parts = raw.rstrip("\n").split("\t")
    if line_no == 1:
        if tuple(p.strip() for p in parts) != QRELS_HEADER:
            raise RowError("<header>", f"expected header {' '.join(QRELS_HEADER)!r} (tab-separated)")
        return None
    if len(parts) != 3:
        raise RowError("<row>", f"expected 3 tab-separated fields, got {len(parts)}")
    query_id, doc_id, score = (p.strip() for p in parts)
    try:
        return query_id, doc_id, int(score)
    except ValueError:
        raise RowError("score", f"not an integer: {score!r}") from None


def _read_qrels(path: Path, queries: dict, corpus: dict, check: _Validator) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    for line_no, raw in _lines(path, check):
        if not raw.strip():
            continue
        try:
            parsed = parse_qrel(raw, line_no)
        except RowError as err:
            check.bad(path, line_no, err.field, err.reason, raw)
            continue
        if parsed is None:
            continue
        query_id, doc_id, grade = parsed
        if query_id not in queries:
            check.bad(path, line_no, "query-id", f"unknown query {query_id!r}", raw)
            continue
        if doc_id not in corpus:
            check.bad(path, line_no, "corpus-id", f"unknown document {doc_id!r}", raw)
            continue
        qrels.setdefault(query_id, {})[doc_id] = grade
    return qrels


def qrels_file(root: Path, split: str) -> Path:
    """``root/qrels/<split>.tsv``; a `DataError` naming the splits there are when it is missing."""
    path = root / "qrels" / f"{split}.tsv"
    if not path.is_file():
        available = (
            sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        )
        raise DataError(f"{root}: no qrels for split {split!r} at {path} (available: {available or 'none'})")
    return path


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
        qrels = _read_qrels(qrels_file(root, split), queries, corpus, check)
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
