"""BEIR folders, query samples and candidate pairs: one implementation each, run in this process or in Ray.

- `rows`: one row's parsing and errors; `files`: input files and shards; `checks`: reading files with the id
  checks across them; `tasks`: where those tasks run.
- `beir`: the data types (`BeirData` in memory, `BeirDatasets` in Ray) and their readers.
- `sampling`: the seeded query sample.
- `candidates`: where candidates come from (all, BM25, a run); `pairs`: candidate pairs; `training`: a
  distillation's training queries, labelled and unlabelled.
"""

from .beir import (
    DEMO_DATA,
    BeirData,
    BeirDatasets,
    Document,
    Query,
    as_datasets,
    data_root,
    read_beir,
    read_beir_dataset,
    read_corpus_dataset,
)
from .candidates import MAX_ALL_PAIRS, REF_SCHEMA, BM25Index, references
from .pairs import (
    PAIR_SCHEMA,
    build_pairs,
    join_pairs,
    pairs_from_references,
    read_pairs,
    run_pairs,
    run_subset,
)
from .rows import BadRow, DataError, reject_counts, write_rejects
from .sampling import sample_queries, sample_query_ids
from .training import training_queries

__all__ = [
    "DEMO_DATA",
    "MAX_ALL_PAIRS",
    "PAIR_SCHEMA",
    "REF_SCHEMA",
    "BM25Index",
    "BadRow",
    "BeirData",
    "BeirDatasets",
    "DataError",
    "Document",
    "Query",
    "as_datasets",
    "build_pairs",
    "data_root",
    "join_pairs",
    "pairs_from_references",
    "read_beir",
    "read_beir_dataset",
    "read_pairs",
    "read_corpus_dataset",
    "references",
    "reject_counts",
    "run_pairs",
    "run_subset",
    "sample_queries",
    "sample_query_ids",
    "training_queries",
    "write_rejects",
]
