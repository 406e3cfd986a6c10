"""Input files and the shards read from them.

Inputs, in a BEIR folder ``root``:

- ``corpus`` and ``queries``: ``<stem>.jsonl``, ``<stem>.jsonl.gz``, ``<stem>.parquet``, or a folder ``<stem>/`` of
  such shards read in name order. Parquet columns are the JSONL fields; a Parquet row's "line" is its row number
  (from 1).
- ``qrels/<split>.tsv`` (header ``query-id corpus-id score``).
- a TREC run (``qid Q0 docid rank score tag``): a file or a folder of shards.

A `Shard` is what one read task reads: a whole file, or a byte range of an uncompressed one (`plan_shards`; line
numbers stay exact because each range's newlines are counted first). `read_shard` parses and validates its rows
(`rows`) into `READ_SCHEMAS` and returns the bad ones.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from .rows import (
    LINE_TOO_LONG,
    MAX_LINE_BYTES,
    RAW_CHARS,
    DataError,
    RowError,
    decode_line,
    parse_json_line,
    parse_qrel,
    parse_record,
    parse_run_line,
    raw_text,
)

Kind = Literal["corpus", "queries", "qrels", "run"]
RANGE_BYTES = (
    64 << 20
)  # an uncompressed file read in Ray is cut into ranges of this many bytes, one task each

# The rows a read task keeps (good rows only): ids, payload, and where each came from.
WHERE = [("_file", pa.int32()), ("_line", pa.int64())]
READ_SCHEMAS: dict[str, pa.Schema] = {
    "corpus": pa.schema([("doc_id", pa.string()), ("title", pa.string()), ("text", pa.string()), *WHERE]),
    "queries": pa.schema([("query_id", pa.string()), ("query_text", pa.string()), *WHERE]),
    "qrels": pa.schema(
        [
            ("query_id", pa.string()),
            ("doc_id", pa.string()),
            ("grade", pa.int32()),
            ("raw", pa.string()),
            *WHERE,
        ]
    ),
    "run": pa.schema([("query_id", pa.string()), ("doc_id", pa.string()), ("rank", pa.float64()), *WHERE]),
}


def input_files(root: Path, stem: str) -> list[Path]:
    """``root/<stem>.jsonl``, ``.jsonl.gz`` or ``.parquet``, or the shards in the folder ``root/<stem>/``."""
    for suffix in (".jsonl", ".jsonl.gz", ".parquet"):
        if (root / f"{stem}{suffix}").is_file():
            return [root / f"{stem}{suffix}"]
    folder = root / stem
    if folder.is_dir():
        shards = sorted(p for p in folder.iterdir() if p.is_file() and file_format(p) is not None)
        if shards:
            return shards
        raise DataError(f"{folder}: no .jsonl, .jsonl.gz or .parquet shards")
    raise DataError(
        f"{root}: no {stem}.jsonl, {stem}.jsonl.gz, {stem}.parquet or {stem}/ folder of shards (is this a BEIR folder?)"
    )


def qrels_file(root: Path, split: str) -> Path:
    """``root/qrels/<split>.tsv``; a `DataError` naming the splits there are when it is missing."""
    path = root / "qrels" / f"{split}.tsv"
    if not path.is_file():
        available = (
            sorted(p.stem for p in (root / "qrels").glob("*.tsv")) if (root / "qrels").is_dir() else []
        )
        raise DataError(f"{root}: no qrels for split {split!r} at {path} (available: {available or 'none'})")
    return path


def run_files(run: str | Path) -> list[Path]:
    """A TREC run: the file, or the files of a folder of shards in name order."""
    run = Path(run)
    if not run.is_dir():
        return [run]
    files = sorted(p for p in run.iterdir() if p.is_file())
    if not files:
        raise DataError(f"{run}: an empty run folder")
    return files


def file_format(path: Path) -> str | None:
    """``gz``, ``parquet`` or ``text`` by the file name; None for a file no reader takes."""
    name = path.name
    if name.endswith((".jsonl.gz", ".tsv.gz", ".trec.gz")):
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


def count_newlines(path: str, start: int, end: int) -> int:
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


def plan_shards(kind: Kind, files: list[Path], tasks, range_bytes: int | None = RANGE_BYTES) -> list[Shard]:
    """One shard per compressed or Parquet file, one per ``range_bytes`` of an uncompressed text file (their first
    line numbers from newline counts run as ``tasks``); ``range_bytes`` None: one shard per file."""
    shards: list[Shard] = []
    counting: list[tuple[int, Any]] = []
    for index, path in enumerate(files):
        fmt = file_format(path) or "text"
        size = path.stat().st_size
        where = str(path.resolve())
        if fmt != "text" or range_bytes is None or size <= range_bytes:
            shards.append(Shard(kind, where, index, fmt))
            continue
        starts = list(range(0, size, range_bytes))
        first = len(shards)
        for start in starts:
            shards.append(Shard(kind, where, index, fmt, start, min(start + range_bytes, size)))
        refs = [
            tasks.submit(count_newlines, where, s, min(s + range_bytes, size), cpus=0.25) for s in starts[:-1]
        ]
        counting.append((first, refs))
    for first, refs in counting:
        line = 1
        for offset, newlines in enumerate([0, *tasks.get(refs)]):
            line += newlines
            shards[first + offset] = replace(shards[first + offset], first_line=line)
    return shards


def shard_lines(shard: Shard):
    """``(line_no, raw bytes)`` of the lines that start inside the shard's byte range; a line longer than
    `MAX_LINE_BYTES` is read past, never held, and yields `LINE_TOO_LONG` instead of its bytes."""
    import gzip

    if shard.fmt == "gz":
        try:
            with gzip.open(shard.path, "rb") as handle:
                line_no = 1
                while raw := handle.readline(MAX_LINE_BYTES + 1):
                    if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                        _skip_line(handle)
                        raw = LINE_TOO_LONG
                    yield line_no, raw
                    line_no += 1
        except (EOFError, OSError) as err:
            raise DataError(f"{shard.path}: not a complete gzip file ({err})") from None
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
            raw = handle.readline(MAX_LINE_BYTES + 1)
            if not raw:
                break
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                skipped = _skip_line(handle)
                yield line_no, LINE_TOO_LONG
                position += len(raw) + skipped
            else:
                yield line_no, raw
                position += len(raw)
            line_no += 1


def _skip_line(handle) -> int:
    """Read past the rest of a line without holding it; returns the bytes read."""
    skipped = 0
    while chunk := handle.readline(2**20):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            break
    return skipped


def _parquet_rows(shard: Shard):
    import pyarrow.parquet as pq

    line_no = 0
    for batch in pq.ParquetFile(shard.path).iter_batches(batch_size=8192):
        for obj in batch.to_pylist():
            line_no += 1
            yield line_no, obj


def _parse(kind: str, line_no: int, value: Any) -> tuple | None:
    """One row's values in `READ_SCHEMAS` order (ids and payload), None for a line to pass over."""
    if kind == "corpus":
        return parse_record(value, "corpus")
    if kind == "queries":
        row_id, _, text = parse_record(value, "queries")
        return row_id, text
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
                reject(line_no, err, json.dumps(obj, default=str, ensure_ascii=False)[:RAW_CHARS])
    else:
        for line_no, raw_bytes in shard_lines(shard):
            text = None
            try:
                if raw_bytes is LINE_TOO_LONG:
                    raise RowError("<row>", f"line longer than {MAX_LINE_BYTES} bytes")
                text = decode_line(raw_bytes, line_no)
                if not text.strip():
                    continue
                value = parse_json_line(text) if shard.kind in ("corpus", "queries") else text
                values = _parse(shard.kind, line_no, value)
                if values is not None:
                    keep(values, line_no, text.rstrip("\n")[:RAW_CHARS] if has_raw else None)
            except RowError as err:
                raw = text if text is not None else raw_text(raw_bytes) if raw_bytes is not None else ""
                reject(line_no, err, raw.rstrip("\n")[:RAW_CHARS])
    return pa.table(columns, schema=schema), bad
