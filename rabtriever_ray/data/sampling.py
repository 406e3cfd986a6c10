"""The query sample: ``max_queries`` of a split's queries, chosen by a seeded hash of their ids.

A query is in the sample when its key (`query_keys`: a 63-bit hash of ``seed`` and its id) is among the
``max_queries`` smallest. The answer depends only on the ids and the seed: the same whether the ids come from a
list in this process (`sample_query_ids`) or from a Ray Dataset of any size (`sample_queries`, where the driver
holds one integer per query), and the same for training, validation, fine-tuning and evaluation.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def query_keys(seed: int, query_ids: Sequence[str]) -> np.ndarray:
    """The sampling key of each query id (int64, non-negative)."""
    return np.fromiter(
        (
            int.from_bytes(hashlib.blake2b(f"{seed}:{qid}".encode(), digest_size=8).digest(), "little") >> 1
            for qid in query_ids
        ),
        np.int64,
        len(query_ids),
    )


def _threshold(keys: np.ndarray, max_queries: int) -> int:
    """The largest key in the sample (ties are all kept: 63-bit keys make them vanishingly rare)."""
    return int(np.partition(keys, max_queries - 1)[max_queries - 1])


def sample_query_ids(query_ids: Sequence[str], max_queries: int | None, seed: int = 0) -> list[str]:
    """The sampled ids, in the order given; all of them when ``max_queries`` is None or not smaller."""
    ids = list(query_ids)
    if max_queries is None or max_queries >= len(ids):
        return ids
    keys = query_keys(seed, ids)
    threshold = _threshold(keys, max_queries)
    return [qid for qid, key in zip(ids, keys) if key <= threshold]


def sample_queries(queries, max_queries: int | None, seed: int = 0):
    """`sample_query_ids` of a Dataset of ``query_id, query_text`` rows: the sampled rows, materialized."""
    if max_queries is None or max_queries >= queries.count():
        return queries

    def keyed(batch: pa.Table) -> pa.Table:
        keys = query_keys(seed, batch.column("query_id").to_pylist())
        return batch.append_column("_key", pa.array(keys, pa.int64()))

    with_keys = queries.map_batches(keyed, batch_format="pyarrow").materialize()
    keys = np.concatenate(
        [b["_key"] for b in with_keys.select_columns(["_key"]).iter_batches(batch_format="numpy")]
    )
    threshold = _threshold(keys, max_queries)
    chosen = with_keys.map_batches(
        lambda b: b.filter(pc.less_equal(b.column("_key"), threshold)), batch_format="pyarrow"
    )
    return chosen.select_columns(["query_id", "query_text"]).materialize()
