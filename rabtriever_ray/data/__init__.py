"""Data readers (BEIR layout) and candidate generation."""

from pathlib import Path

from .beir import BadRow, BeirData, DataError, Document, Query, read_beir, write_rejects
from .candidates import PAIR_SCHEMA, BM25Index, build_pairs, parse_candidates, select_queries

# The bundled demo task (household-robot skills, BEIR layout, train/dev splits); see demo_data/README.md.
DEMO_DATA = Path(__file__).resolve().parent.parent / "demo_data"

__all__ = [
    "DEMO_DATA",
    "BadRow",
    "BeirData",
    "BM25Index",
    "DataError",
    "Document",
    "PAIR_SCHEMA",
    "Query",
    "build_pairs",
    "parse_candidates",
    "read_beir",
    "select_queries",
    "write_rejects",
]
