"""On-policy rounds: the current student chooses which pairs the teacher scores next.

In round ``r >= 1`` every training query's candidate pool (``round_pool``) is scored by the student of round
``r - 1``; ``round_k`` documents are drawn per query *without replacement* from the student's own softmax over its
scores at temperature ``round_tau`` (Gumbel top-k), the query's positives are added, and exactly those pairs go to
the teacher stage and on to training. Round 0 trains on ``candidates`` (or ``teacher_data``) whatever the pool.

A query's pool is a candidate list in training mode (`data.pairs`: its qrel positives added) from a candidate spec
(all | bm25:K | a run file) or, with ``student:K``, from the top K documents of the whole corpus by the first stage
of the student of round ``r - 1`` (`student_pool_references`: the corpus encoded on a Ray Data actor pool, an exact
FAISS inner-product index built block by block in a Ray task, the queries' first-stage vectors searched against
it). The pools are built by the pair builder's in-process driver (`round_pools`, for data read into this process)
or its Ray driver (`sample_round_stream`, for data read in Ray), and one sampler draws from both: `draw_round` maps
a pool of `RoundSampler` actors over blocks of whole lists.

The draw for a query depends only on ``(seed, round, query_id)`` and its pool, not on how Ray Data batches the
queries, so a rerun of an interrupted job picks the same pairs and Ray Train resumes the round from its own
checkpoint.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from .config import DistillConfig
from .data import PAIR_SCHEMA


def gumbel_top_k(scores: torch.Tensor, k: int, tau: float, generator: torch.Generator) -> list[int]:
    """``k`` distinct indices drawn from ``softmax(scores / tau)`` without replacement (all when ``k >= n``).

    Adding Gumbel noise to the logits and taking the top k is exactly sequential sampling without replacement.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    n = scores.numel()
    if k >= n:
        return list(range(n))
    uniform = torch.rand(n, generator=generator, dtype=torch.float64).clamp_(1e-12, 1 - 1e-12)
    keys = scores.double() / tau - torch.log(-torch.log(uniform))
    return keys.topk(k).indices.tolist()


def query_generator(seed: int, round_index: int, query_id: str) -> torch.Generator:
    """A generator seeded by (seed, round, query id) alone, independent of batching and worker."""
    return torch.Generator().manual_seed(zlib.crc32(f"{seed}:{round_index}:{query_id}".encode()))


def _top_k_references(doc_blocks: list, query_blocks: list, k: int) -> pa.Table:
    """Ray task: each query's top ``k`` documents by inner product, exact, as `data.REF_SCHEMA` rows (rank
    1 = best). ``doc_blocks`` / ``query_blocks``: object refs of ``doc_id, doc_vec`` / ``query_id, q_vec`` tables
    (a list keeps Ray from resolving them all at once): the flat index is built one block at a time, so the task
    holds the index, the document ids and one block."""
    import ray

    from .data import references
    from .faiss_build import faiss_index_from_chunks, matrix_of

    # Arrow string arrays, not Python lists: a million ids stay a few tens of MB.
    doc_ids = pa.chunked_array([ray.get(ref).column("doc_id") for ref in doc_blocks]).combine_chunks()
    dim = ray.get(doc_blocks[0]).schema.field("doc_vec").type.list_size
    index = faiss_index_from_chunks(
        lambda: (matrix_of(ray.get(ref).column("doc_vec"), dim) for ref in doc_blocks), len(doc_ids), dim
    )
    depth = min(k, len(doc_ids))
    out = [references(pa.array([], pa.string()), pa.array([], pa.string()), pa.array([], pa.float64()))]
    for ref in query_blocks:
        block = ray.get(ref)
        _, ids = index.search(matrix_of(block.column("q_vec"), dim), depth)
        rows = len(block)
        out.append(
            references(
                block.column("query_id").take(pa.array(np.repeat(np.arange(rows), depth))),
                doc_ids.take(pa.array(ids.reshape(-1))),
                pa.array(np.tile(np.arange(1, depth + 1, dtype=np.float64), rows)),
            )
        )
    return pa.concat_tables(out)


def student_pool_references(
    cfg: DistillConfig, corpus, queries, checkpoint: Any, k: int, cpus: float, gpus: float
):
    """Each query's top ``k`` documents of the whole corpus by the first stage of the student in ``checkpoint``:
    inner products of ``embed_queries`` and ``embed_documents`` vectors, exact; a Dataset of references
    (`data.REF_SCHEMA`, rank 1 = best), for `data.join_pairs`.

    ``corpus``: a Dataset of ``doc_id, doc_text`` or a mapping of documents (`encode_corpus_dataset`); ``queries``:
    a Dataset of ``query_id, query_text``. Documents and queries are encoded on Ray Data actor pools
    (`encode_corpus_dataset`, `QueryEncoder`; up to ``teacher_actors`` actors of ``cpus`` / ``gpus`` each); one Ray
    task builds a flat FAISS index from the encoded blocks, one at a time, and searches it (`_top_k_references`):
    the corpus vectors must fit one node (4 bytes x the projection width per document), the driver holds none.
    """
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from .index import QueryEncoder, encode_corpus_dataset

    encoded = encode_corpus_dataset(
        corpus, checkpoint, cfg.teacher, cfg.teacher_batch_size, (1, cfg.teacher_actors), cpus, gpus
    )
    vectors = queries.map_batches(
        QueryEncoder,
        fn_constructor_kwargs={"checkpoint": checkpoint, "teacher": cfg.teacher},
        batch_size=64,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=cfg.teacher_actors),
        num_cpus=cpus,
        num_gpus=gpus,
    )
    doc_blocks = encoded.select_columns(["doc_id", "doc_vec"]).to_arrow_refs()
    query_blocks = vectors.to_arrow_refs()
    search = ray.remote(_top_k_references).options(num_cpus=min(cpus, 1.0))
    return ray.data.from_arrow_refs([search.remote(doc_blocks, query_blocks, k)])


def round_pools(
    cfg: DistillConfig, data, checkpoint: Any = None, cpus: float = 1.0, gpus: float = 0.0
) -> pa.Table:
    """The pools of an in-process `BeirData`: each sampled training query's candidate list in training mode
    (`PAIR_SCHEMA`, query by query), from ``round_pool``.

    A ``student:K`` pool needs ``checkpoint``, the student whose first stage retrieves it (`student_pool_references`,
    on actors of ``cpus`` / ``gpus`` each).
    """
    import ray

    from .data import as_datasets, build_pairs, pairs_from_references, sample_query_ids

    spec = cfg.round_pool_spec
    if spec.kind != "student":
        return build_pairs(data, cfg.round_pool, cfg.max_train_queries, cfg.seed, training=True)
    if checkpoint is None:
        raise ValueError(
            f"round_pool {cfg.round_pool!r} draws from a student's first stage: it needs the checkpoint of "
            "the round before (round 0 trains on candidates)"
        )
    query_ids = sample_query_ids(list(data.queries), cfg.max_train_queries, cfg.seed)
    beir = as_datasets(data, query_ids)
    refs = student_pool_references(cfg, beir.corpus, beir.queries, checkpoint, spec.k, cpus, gpus)
    table = pa.concat_tables([ray.get(ref) for ref in refs.to_arrow_refs()])
    return pairs_from_references(data, table, query_ids, training=True)


class RoundSampler:
    """Ray Data actor: the round's student scores each query's pool and draws the pairs the teacher scores next.

    Each block holds whole pools: candidate pairs in `PAIR_SCHEMA` (a query's pool is its rows, its positives the
    rows with label > 0). The output keeps each query's drawn pairs in its block, query by query.

    Args:
        cfg: the run's `DistillConfig` (teacher spec and prompt, ``round_k``, ``round_tau``, seed; the student's
            shape is the checkpoint's).
        checkpoint: the previous round's `ray.train.Checkpoint` (or a directory with ``student.safetensors``).
        round_index: the round being prepared (seeds the draws).
    """

    def __init__(self, cfg: DistillConfig, checkpoint: Any, round_index: int):
        from .distill_loop import EmbeddingCache
        from .student import load_student

        self.student = load_student(checkpoint, cfg.teacher)
        self.cfg = cfg
        self.round_index = round_index
        self.doc_cache = EmbeddingCache(self.student.encode_documents)

    def __call__(self, block: pa.Table) -> pa.Table:
        lists: dict[str, tuple[str, list[str], list[str]]] = {}
        documents: dict[str, str] = {}
        labels: dict[tuple[str, str], int] = {}
        for qid, did, grade, qtext, dtext in zip(*(block.column(c).to_pylist() for c in PAIR_SCHEMA.names)):
            _, pool, positives = lists.setdefault(qid, (qtext, [], []))
            pool.append(did)
            if grade > 0:
                positives.append(did)
            documents[did] = dtext
            labels[qid, did] = grade
        return self.draw(
            list(lists),
            [entry[0] for entry in lists.values()],
            [entry[1] for entry in lists.values()],
            [entry[2] for entry in lists.values()],
            documents,
            lambda qid, did: labels[qid, did],
        )

    def draw(
        self,
        query_ids: Sequence[str],
        texts: Sequence[str],
        pools: Sequence[Sequence[str]],
        positives: Sequence[Sequence[str]],
        documents: dict[str, str],
        label: Callable[[str, str], int],
    ) -> pa.Table:
        """Score each query's pool, draw ``round_k`` of it (`gumbel_top_k`, seeded by query), add the positives
        not drawn: `PAIR_SCHEMA` rows, query by query in the order given."""
        docs = list(dict.fromkeys(d for pool in pools for d in pool))
        column = {d: j for j, d in enumerate(docs)}
        with torch.no_grad():
            h_query = self.student.encode_queries(texts)
            h_doc = self.doc_cache([documents[d] for d in docs])
            scores = self.student.rerank(h_query, h_doc, [[column[d] for d in pool] for pool in pools])
        rows: dict[str, list] = {name: [] for name in PAIR_SCHEMA.names}
        for qid, qtext, pool, pos, pool_scores in zip(query_ids, texts, pools, positives, scores):
            generator = query_generator(self.cfg.seed, self.round_index, qid)
            drawn = [
                pool[j] for j in gumbel_top_k(pool_scores, self.cfg.round_k, self.cfg.round_tau, generator)
            ]
            drawn += [d for d in pos if d not in drawn]
            for did in drawn:
                rows["query_id"].append(qid)
                rows["doc_id"].append(did)
                rows["label"].append(label(qid, did))
                rows["query_text"].append(qtext)
                rows["doc_text"].append(documents[did])
        return pa.table(rows, schema=PAIR_SCHEMA)


def draw_round(cfg: DistillConfig, pools, checkpoint: Any, round_index: int, cpus: float, gpus: float):
    """The pairs of round ``round_index`` drawn from ``pools`` (a Dataset of whole lists per block) by a pool of
    `RoundSampler` actors of ``cpus`` / ``gpus`` each; materialized, each query's pairs in one block (the teacher
    stage and `raytrain.WholeBlockSplit` keep them together)."""
    from ray.data import ActorPoolStrategy

    return pools.map_batches(
        RoundSampler,
        fn_constructor_kwargs={"cfg": cfg, "checkpoint": checkpoint, "round_index": round_index},
        batch_size=None,  # a block: whole lists
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=cfg.teacher_actors),
        num_cpus=cpus,
        num_gpus=gpus,
    ).materialize()


def sample_round_pairs(cfg: DistillConfig, data, checkpoint: Any, round_index: int, cpus: float) -> pa.Table:
    """The pairs of round ``round_index`` for an in-process `BeirData` (`round_pools`, `draw_round`), gathered and
    sorted by query: the training stage cuts its blocks at query boundaries (`pipeline.pairs_dataset`), so each
    training batch holds whole candidate lists for the listwise terms."""
    import ray

    from .pipeline import pairs_dataset
    from .runtime import default_gpus

    gpus = default_gpus(cfg.teacher_gpus, cfg.use_gpu)
    pools = round_pools(cfg, data, checkpoint, cpus, gpus)
    per_list = len(pools) / max(1, len(pc.unique(pools.column("query_id"))))
    blocks = pairs_dataset(
        pools, max(1, round(64 * per_list)), whole_queries=True
    )  # about 64 queries a block
    drawn = draw_round(cfg, blocks, checkpoint, round_index, cpus, gpus)
    table = pa.concat_tables(ray.get(drawn.to_arrow_refs())).cast(PAIR_SCHEMA)
    return table.sort_by([("query_id", "ascending"), ("doc_id", "ascending")])


def sample_round_stream(
    cfg: DistillConfig, beir, checkpoint: Any, round_index: int, cpus: float, min_partitions: int = 1
) -> tuple[Any, dict[str, int]]:
    """`sample_round_pairs` for data read in Ray (`data.read_beir_dataset`): the driver holds counts.

    The pools are joined in Ray Data (`data.join_pairs`, training mode: whole lists per block, positives added)
    from the ``round_pool`` run file or from the student's first stage (``student:K``, `student_pool_references`),
    and drawn by `draw_round`. Returns the drawn pairs and ``{"pairs", "queries"}``. The actors take ``cpus``
    each: leave the cluster a CPU for Ray Data's own tasks (projections, joins), which feed them.
    """
    from dataclasses import replace

    from .data import join_pairs, run_pairs, sample_queries
    from .runtime import default_gpus

    gpus = default_gpus(cfg.teacher_gpus, cfg.use_gpu)
    spec = cfg.round_pool_spec
    if spec.kind != "student":
        pools, _ = run_pairs(
            beir, cfg.round_pool, True, cfg.max_train_queries, cfg.seed, min_partitions=min_partitions
        )
    else:
        queries = sample_queries(beir.queries, cfg.max_train_queries, cfg.seed)
        refs = student_pool_references(cfg, beir.corpus, queries, checkpoint, spec.k, cpus, gpus)
        pools, _ = join_pairs(
            replace(beir, queries=queries), refs, refs.count(), True, min_partitions=min_partitions
        )
    drawn = draw_round(cfg, pools, checkpoint, round_index, cpus, gpus)
    queries = drawn.map_batches(
        lambda block: pa.table({"n": [len(pc.unique(block.column("query_id")))]}),
        batch_size=None,
        batch_format="pyarrow",
    ).sum("n")
    return drawn, {"pairs": drawn.count(), "queries": int(queries or 0)}
