"""FAISS construction: inner-product indexes over float32 vectors, built chunk by chunk.

`faiss_index_from_chunks` builds a ``flat`` (exact), ``hnsw`` or ``ivf`` index from vectors that arrive in chunks
(files, Ray blocks), so peak memory is the index plus one chunk; `faiss_index` is the one-chunk case. Flat and IVF
indexes are built on the GPUs when ``faiss.get_num_gpus() > 0`` and handed back as CPU indexes (ready to save or
search). `matrix_of` turns the fixed-size-list columns the vectors are stored in into the arrays FAISS takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Literal

import numpy as np
import pyarrow as pa

IndexType = Literal["flat", "hnsw", "ivf"]
IVF_TRAIN_POINTS_PER_LIST = 256  # FAISS's advice: 39 to 256 training points per inverted list


def matrix_of(column: pa.ChunkedArray | pa.Array, width: int) -> np.ndarray:
    """A fixed-size-list column as a ``[rows, width]`` float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width).astype(np.float32, copy=False)


def faiss_index(
    vectors: np.ndarray,
    index_type: IndexType = "flat",
    hnsw_m: int = 32,
    nlist: int | None = None,
    use_gpu: bool | None = None,
):
    """A FAISS inner-product index over ``[n, k]`` float32 ``vectors`` (a CPU index, ready to save or search);
    `faiss_index_from_chunks` over one chunk."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return faiss_index_from_chunks(
        lambda: iter([vectors]), *vectors.shape, index_type, hnsw_m, nlist, use_gpu
    )


def faiss_index_from_chunks(
    chunks: Callable[[], Iterator[np.ndarray]],
    count: int,
    dim: int,
    index_type: IndexType = "flat",
    hnsw_m: int = 32,
    nlist: int | None = None,
    use_gpu: bool | None = None,
    seed: int = 0,
):
    """A FAISS inner-product index over ``count`` vectors of width ``dim`` that ``chunks()`` yields as float32
    ``[rows, dim]`` arrays, added chunk by chunk: peak memory is the index plus one chunk.

    ``ivf`` clusters into ``nlist`` lists (default ``4 sqrt(n)``, at most ``n / 39`` so each list has the 39
    training points FAISS asks for), trained on a seeded sample of at most `IVF_TRAIN_POINTS_PER_LIST` x
    ``nlist`` vectors drawn from every chunk (all of them up to about a million vectors at the default
    ``nlist``); ``chunks`` is then called twice. Flat and IVF indexes are built on the GPUs when there are any.
    """
    import faiss

    if count == 0:
        raise ValueError("cannot index an empty corpus")
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim)
    elif index_type == "hnsw":
        index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
    elif index_type == "ivf":
        nlist = nlist or max(1, min(int(4 * math.sqrt(count)), count // 39))
        if nlist > count:
            raise ValueError(f"nlist={nlist} is more than the {count} documents")
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        raise ValueError(f"index_type must be flat, hnsw or ivf, got {index_type!r}")
    on_gpu = (faiss.get_num_gpus() > 0 if use_gpu is None else use_gpu) and index_type != "hnsw"
    if on_gpu:
        index = faiss.index_cpu_to_all_gpus(index)
    if not index.is_trained:
        index.train(ivf_training_sample(chunks, count, nlist, seed))
    added = 0
    for chunk in chunks():
        index.add(np.ascontiguousarray(chunk, dtype=np.float32))
        added += len(chunk)
    if added != count:
        raise RuntimeError(f"indexed {added} vectors, expected {count}")
    return faiss.index_gpu_to_cpu(index) if on_gpu else index


def ivf_training_sample(
    chunks: Callable[[], Iterator[np.ndarray]], count: int, nlist: int, seed: int = 0
) -> np.ndarray:
    """IVF training vectors: every vector when ``count`` is at most `IVF_TRAIN_POINTS_PER_LIST` x ``nlist``, else
    each vector kept with that share (seeded), so the sample comes from every chunk."""
    share = min(1.0, IVF_TRAIN_POINTS_PER_LIST * nlist / count)
    generator = np.random.default_rng(seed)
    sample = [chunk if share == 1.0 else chunk[generator.random(len(chunk)) < share] for chunk in chunks()]
    return np.ascontiguousarray(np.concatenate(sample), dtype=np.float32)
