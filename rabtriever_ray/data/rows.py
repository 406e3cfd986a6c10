"""One row of a BEIR or TREC file: decoding, parsing and the errors that name file, line and field.

Both readers (`beir.read_beir` in this process, `beir.read_beir_dataset` in Ray tasks) parse every row with these
functions, so a bad row gets the same message whichever reads it. A row function raises `RowError` (field and
reason); the reader adds the file, the line and the raw text (`BadRow`) and applies the ``on_bad_row`` policy
(`BadRowPolicy`): ``fail`` raises the first bad row in file order as a `DataError`, ``skip`` records it for
``rejects.jsonl`` (`write_rejects`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

OnBadRow = Literal["fail", "skip"]
QRELS_HEADER = ("query-id", "corpus-id", "score")
RUN_FORMAT = "qid Q0 docid rank score tag"
BOM = b"\xef\xbb\xbf"
RAW_CHARS = 2000  # as much of a bad row as a reject keeps
MAX_GRADE = 127  # relevance grades are 0..MAX_GRADE (they are stored as int8)
MAX_LINE_BYTES = 32 * 2**20  # a longer line is a bad row, read past without holding it
LINE_TOO_LONG = None  # what `files.shard_lines` yields for such a line instead of its bytes


class DataError(ValueError):
    """A bad row or file; the message names the file, the line and the field."""


class RowError(ValueError):
    """One row's problem: the field and the reason (the reader adds file, line and raw text)."""

    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field = field_name
        self.reason = reason


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


def write_rejects(rejects: list[BadRow], path: str | Path) -> None:
    """Write rejected rows as JSONL (``file``, ``line``, ``field``, ``reason``, ``raw``)."""
    with open(path, "w", encoding="utf-8") as handle:
        for bad in rejects:
            handle.write(json.dumps(asdict(bad)) + "\n")


class BadRowPolicy:
    """The ``on_bad_row`` policy: checked once, and the error that stops a ``fail`` read."""

    def __init__(self, on_bad_row: OnBadRow, hint: bool = True):
        if on_bad_row not in ("fail", "skip"):
            raise ValueError(f"on_bad_row must be 'fail' or 'skip', got {on_bad_row!r}")
        self.on_bad_row = on_bad_row
        self.hint = hint  # whether on_bad_row='skip' is an option for this file

    def fail(self, row: BadRow) -> None:
        """Raise ``row`` as the `DataError` that stops a ``fail`` read."""
        hint = " (use on_bad_row='skip' to write it to rejects.jsonl and go on)" if self.hint else ""
        raise DataError(row.message() + hint)


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


def parse_json_line(raw: str) -> Any:
    """A JSONL line's value; `RowError` (field ``<json>``) when it is not JSON."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError as err:
        raise RowError("<json>", f"malformed JSON: {err.msg} at column {err.colno}") from None


def parse_record(obj: Any, kind: Literal["corpus", "queries"]) -> tuple[str, str, str]:
    """A corpus or queries row (a parsed JSON value) as ``(id, title, text)``; `RowError` names the field at
    fault. A query's title is always ``""``; ``metadata``, when present, must be an object."""
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
    if not isinstance(obj.get("metadata") or {}, dict):
        raise RowError("metadata", "not a JSON object")
    for name, value in (("_id", row_id), ("title", title), ("text", text)):
        _check_unicode(name, value)
    return row_id, title if kind == "corpus" else "", text


def _check_unicode(field_name: str, value: str) -> None:
    """`RowError` when ``value`` holds a lone surrogate (a JSON ``\\ud83d`` escape with no pair): it is no text
    any tokenizer or file can take."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowError(field_name, f"not valid Unicode: a lone surrogate at character {err.start}") from None


def duplicate_reason(row_id: str, first_line: int) -> str:
    return f"duplicate id {row_id!r} (first on line {first_line})"


def parse_qrel(raw: str, line_no: int) -> tuple[str, str, int] | None:
    """A qrels line as ``(query_id, doc_id, grade)``, or None for the header (line 1, checked); `RowError`
    names the field at fault. Whether the ids exist is the reader's check."""
    parts = raw.rstrip("\n").split("\t")
    if line_no == 1:
        if tuple(p.strip() for p in parts) != QRELS_HEADER:
            raise RowError("<header>", f"expected header {' '.join(QRELS_HEADER)!r} (tab-separated)")
        return None
    if len(parts) != 3:
        raise RowError("<row>", f"expected 3 tab-separated fields, got {len(parts)}")
    query_id, doc_id, score = (p.strip() for p in parts)
    # Digits only: int() would also read "1_0" as 10 and "+1" as 1.
    if not score.isdecimal() or not score.isascii():
        if score.startswith("-") and score[1:].isdecimal():
            raise RowError("score", f"negative grade {score}: grades are 0 (not relevant) to {MAX_GRADE}")
        raise RowError("score", f"not an integer: {score!r}")
    if int(score) > MAX_GRADE:
        raise RowError("score", f"grade {score} is over {MAX_GRADE}: grades are 0 (not relevant) to {MAX_GRADE}")
    return query_id, doc_id, int(score)


def parse_run_line(raw: str) -> tuple[str, str, float] | None:
    """A TREC run line as ``(query_id, doc_id, rank)``, None when blank; `RowError` names the field at fault."""
    parts = raw.split()
    if not parts:
        return None
    if len(parts) != 6:
        raise RowError("<row>", f"expected {RUN_FORMAT!r}, got {len(parts)} fields")
    try:
        rank = float(parts[3])
    except ValueError:
        raise RowError("rank", f"not a number: {parts[3]!r}") from None
    if not math.isfinite(rank) or rank < 0:
        raise RowError("rank", f"not a finite rank >= 0: {parts[3]!r}")
    return parts[0], parts[2], rank
