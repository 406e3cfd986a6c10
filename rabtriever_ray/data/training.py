"""A distillation's training queries: the seeded sample of a labelled split, and unlabelled queries beside it.

Distillation needs no labels: the teacher scores any query's candidates. `training_queries` gives the job one
in-process `BeirData` whose ``queries`` are exactly the queries it trains on (the labelled sample first, then the
unlabelled ones) and whose ``qrels`` judge only the labelled ones, so that their pairs are labelled as read while
the unlabelled queries' pairs are unknown (label -1, `pairs.pairs_from_references`). The unlabelled queries come
from

- ``rest``: the training split's queries that ``max_train_queries`` left out, their labels unused, or
- a queries file in the ``queries.jsonl`` format (JSONL, JSONL.gz or Parquet, read with the same checks: a bad
  line is an error naming the file and line), or
- ``auto`` (`unlabelled_source`): the training folder's ``unlabelled_queries.jsonl`` when it has one,

and never include a validation query (same id or same text) or a labelled training query.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from ..config.schema import AUTO_UNLABELLED, UNLABELLED_FILE
from .beir import BeirData, Query, query_dict
from .checks import read_checked
from .rows import DataError
from .sampling import sample_query_ids
from .tasks import LocalTasks

logger = logging.getLogger(__name__)


def unlabelled_source(cfg, train_root: Path) -> str:
    """A distillation's ``unlabelled_queries`` (``cfg``, a `DistillConfig`) with ``auto`` resolved: the training
    folder's `UNLABELLED_FILE` where the job builds its training candidates (``cfg.builds_candidates``) and the
    folder has one, else none."""
    if cfg.unlabelled_queries != AUTO_UNLABELLED:
        return cfg.unlabelled_queries
    return UNLABELLED_FILE if cfg.builds_candidates and (train_root / UNLABELLED_FILE).is_file() else ""


def unlabelled_file(source: str, train_root: Path) -> Path:
    """The queries file ``source`` names: looked up in the training folder first, then as given."""
    path = Path(source)
    if not path.is_absolute() and (train_root / path).is_file():
        return train_root / path
    if not path.is_file():
        raise DataError(f"unlabelled_queries: no queries file {source!r} (looked in {train_root} and here)")
    return path


def read_queries_file(path: Path) -> dict[str, Query]:
    """Every query of a ``queries.jsonl``-format file, checked as a BEIR folder's queries are."""
    tables, _, _ = read_checked({"queries": [path]}, "fail", LocalTasks())
    return query_dict(tables["queries"])


def training_queries(
    train: BeirData,
    max_labelled: int | None,
    seed: int,
    unlabelled: str = "",
    max_unlabelled: int | None = None,
    exclude: BeirData | None = None,
) -> tuple[BeirData, dict[str, int]]:
    """``train`` cut to the queries a distillation trains on, and their counts ``{"labelled", "unlabelled"}``.

    The labelled queries are the `sampling` sample of ``max_labelled`` (as `pairs.build_pairs` samples them); the
    unlabelled ones (``unlabelled``: ``rest`` or a queries file, see the module docstring) are a seeded sample
    of ``max_unlabelled`` of those left after dropping every id or text of ``exclude`` (the validation queries).
    """
    labelled = sample_query_ids(list(train.queries), max_labelled, seed)
    queries = {q: train.queries[q] for q in labelled}
    pool: dict[str, Query] = {}
    if unlabelled == "rest":
        pool = {q: query for q, query in train.queries.items() if q not in queries}
    elif unlabelled:
        pool = read_queries_file(unlabelled_file(unlabelled, Path(train.root)))
    if pool:
        held = exclude.queries if exclude is not None else {}
        held_texts = {query.text.strip() for query in held.values()}
        kept = {
            q: query
            for q, query in pool.items()
            if q not in queries and q not in held and query.text.strip() not in held_texts
        }
        if len(kept) < len(pool):
            logger.info(
                "unlabelled queries: left out %d that are labelled training or validation queries",
                len(pool) - len(kept),
            )
        if not kept:
            raise DataError(
                f"unlabelled_queries {unlabelled!r}: no query left beside the training and validation ones"
            )
        chosen = sample_query_ids(list(kept), max_unlabelled, seed)
        queries.update((q, kept[q]) for q in chosen)
    qrels = {q: train.qrels[q] for q in labelled if q in train.qrels}
    counts = {"labelled": len(labelled), "unlabelled": len(queries) - len(labelled)}
    return dataclasses.replace(train, queries=queries, qrels=qrels), counts
