"""On-policy rounds: the current student chooses which pairs the teacher scores next.

In round ``r >= 1`` every training query's candidate pool (``round_pool``) is scored by the student of round
``r - 1``; ``round_k`` documents are drawn per query *without replacement* from the student's own softmax over its
scores at temperature ``round_tau`` (Gumbel top-k), the query's positives are added, and exactly those pairs go to
the teacher stage and on to training. Round 0 trains on ``candidates`` (or ``teacher_data``) whatever the pool.

The pool of a query is its qrel positives plus either the candidates of a `build_pairs` policy (all | bm25:K | a
run file) or, with ``student:K``, the top K documents of the whole corpus by the first stage of the student of
round ``r - 1`` (`student_pools`: the corpus encoded on a Ray Data actor pool, an exact FAISS inner-product
index built block by block, the queries' first-stage vectors searched against it).

The draw for a query depends only on ``(seed, round, query_id)``, not on how Ray Data batches the queries, so a
rerun of an interrupted job picks the same pairs and Ray Train resumes the round from its own checkpoint.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import torch

from .config import ConfigError, DistillConfig
from .data.candidates import PAIR_SCHEMA, build_pairs, select_queries, spec_count


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


def student_pool_size(spec: str) -> int | None:
    """K of a ``student:K`` round pool; None for the `build_pairs` policies (all | bm25:K | a run file)."""
    if not spec.startswith("student:"):
        return None
    return spec_count(spec, "round_pool", ConfigError)


def student_pools(
    cfg: DistillConfig, data, query_ids: Sequence[str], checkpoint: Any, k: int, cpus: float, gpus: float
) -> dict[str, list[str]]:
    """Each query's top ``k`` documents of the whole corpus (best first) by the first stage of the student in
    ``checkpoint``: inner products of ``embed_queries`` and ``embed_documents`` vectors, exact.

    Documents and queries are encoded on Ray Data actor pools (`encode_corpus_dataset`, `QueryEncoder`; up to
    ``teacher_actors`` actors of ``cpus`` / ``gpus`` each); the driver builds a flat FAISS index from the encoded
    blocks one at a time (`faiss_index_from_chunks`) and searches it one block of queries at a time.
    """
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from .index import QueryEncoder, _matrix, encode_corpus_dataset, faiss_index_from_chunks

    actors = (1, cfg.teacher_actors)
    encoded = encode_corpus_dataset(
        data.corpus, checkpoint, cfg.teacher, cfg.teacher_batch_size, actors, cpus, gpus
    )
    doc_blocks = encoded.select_columns(["doc_id", "doc_vec"]).to_arrow_refs()
    doc_ids = [d for block in doc_blocks for d in ray.get(block).column("doc_id").to_pylist()]
    dim = ray.get(doc_blocks[0]).schema.field("doc_vec").type.list_size
    index = faiss_index_from_chunks(
        lambda: (_matrix(ray.get(block).column("doc_vec"), dim) for block in doc_blocks), len(doc_ids), dim
    )
    doc_blocks.clear()  # the index holds its own copy of the vectors: release the blocks
    texts = [data.queries[qid].text for qid in query_ids]
    vectors = ray.data.from_arrow(pa.table({"query_id": list(query_ids), "query_text": texts})).map_batches(
        QueryEncoder,
        fn_constructor_kwargs={"checkpoint": checkpoint, "teacher": cfg.teacher},
        batch_size=64,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=cfg.teacher_actors),
        num_cpus=cpus,
        num_gpus=gpus,
    )
    pools: dict[str, list[str]] = {}
    for ref in vectors.to_arrow_refs():
        block = ray.get(ref)
        _, ids = index.search(_matrix(block.column("q_vec"), dim), min(k, len(doc_ids)))
        for qid, row in zip(block.column("query_id").to_pylist(), ids):
            pools[qid] = [doc_ids[j] for j in row]
    return pools


def pools_table(
    cfg: DistillConfig, data, checkpoint: Any = None, cpus: float = 1.0, gpus: float = 0.0
) -> pa.Table:
    """One row per training query: its text, its candidate pool and its positives (the sampler's input).

    A ``student:K`` pool needs ``checkpoint``, the student whose first stage retrieves it (`student_pools`, on
    actors of ``cpus`` / ``gpus`` each).
    """
    pools: dict[str, dict[str, Any]] = {}
    k = student_pool_size(cfg.round_pool)
    if k is not None:
        if checkpoint is None:
            raise ValueError(
                f"round_pool {cfg.round_pool!r} draws from a student's first stage: it needs the checkpoint of "
                "the round before (round 0 trains on candidates)"
            )
        query_ids = select_queries(data, cfg.max_train_queries, cfg.seed)
        retrieved = student_pools(cfg, data, query_ids, checkpoint, k, cpus, gpus)
        for qid in query_ids:
            positives = [d for d, grade in data.qrels.get(qid, {}).items() if grade > 0]
            pool = retrieved[qid] + [d for d in positives if d not in retrieved[qid]]
            pools[qid] = {"query_text": data.queries[qid].text, "pool": pool, "positives": positives}
    else:
        pairs = build_pairs(data, cfg.round_pool, cfg.max_train_queries, cfg.seed, training=True)
        for qid, did, label, qtext in zip(
            pairs.column("query_id").to_pylist(),
            pairs.column("doc_id").to_pylist(),
            pairs.column("label").to_pylist(),
            pairs.column("query_text").to_pylist(),
        ):
            entry = pools.setdefault(qid, {"query_text": qtext, "pool": [], "positives": []})
            entry["pool"].append(did)
            if label > 0:
                entry["positives"].append(did)
    return pa.table(
        {
            "query_id": list(pools),
            "query_text": [p["query_text"] for p in pools.values()],
            "pool": [p["pool"] for p in pools.values()],
            "positives": [p["positives"] for p in pools.values()],
        }
    )


class StudentSampler:
    """Ray Data actor: the round's student scores each query's pool and draws the pairs the teacher scores next.

    Args:
        cfg: the run's `DistillConfig` (teacher spec and prompt, ``round_k``, ``round_tau``, seed; the student's
            shape is the checkpoint's).
        checkpoint: the previous round's `ray.train.Checkpoint` (or a directory with ``student.safetensors``).
        documents: ``doc_id -> text`` for every pooled document; each is encoded once per actor.
        qrels: ``query_id -> {doc_id: grade}`` for the labels of the drawn pairs.
        round_index: the round being prepared (seeds the draws).
    """

    def __init__(
        self,
        cfg: DistillConfig,
        checkpoint: Any,
        documents: Mapping[str, str],
        qrels: Mapping[str, Mapping[str, int]],
        round_index: int,
    ):
        from .student import load_student
        from .train import EmbeddingCache

        self.student = load_student(checkpoint, cfg.teacher)
        self.documents = dict(documents)
        self.qrels = qrels
        self.cfg = cfg
        self.round_index = round_index
        self.doc_cache = EmbeddingCache(self.student.encode_documents)

    def __call__(self, batch: pa.Table) -> pa.Table:
        query_ids = batch.column("query_id").to_pylist()
        pools: list[Sequence[str]] = batch.column("pool").to_pylist()
        positives = batch.column("positives").to_pylist()
        texts = batch.column("query_text").to_pylist()
        docs = list(dict.fromkeys(d for pool in pools for d in pool))
        column = {d: j for j, d in enumerate(docs)}
        with torch.no_grad():
            h_query = self.student.encode_queries(texts)
            h_doc = self.doc_cache([self.documents[d] for d in docs])
            scores = self.student.rerank(h_query, h_doc, [[column[d] for d in pool] for pool in pools])
        rows: dict[str, list] = {name: [] for name in PAIR_SCHEMA.names}
        for qid, qtext, pool, pos, pool_scores in zip(query_ids, texts, pools, positives, scores):
            generator = query_generator(self.cfg.seed, self.round_index, qid)
            drawn = [
                pool[j] for j in gumbel_top_k(pool_scores, self.cfg.round_k, self.cfg.round_tau, generator)
            ]
            drawn += [d for d in pos if d not in drawn]
            judged = self.qrels.get(qid, {})
            for did in drawn:
                rows["query_id"].append(qid)
                rows["doc_id"].append(did)
                rows["label"].append(judged.get(did, 0))
                rows["query_text"].append(qtext)
                rows["doc_text"].append(self.documents[did])
        return pa.table(rows, schema=PAIR_SCHEMA)


def sample_round_pairs(cfg: DistillConfig, data, checkpoint: Any, round_index: int, cpus: float) -> pa.Table:
    """The pairs of round ``round_index``, drawn by the previous round's student on a Ray Data actor pool.

    Sorted by query: the training stage cuts its blocks at query boundaries (`pipeline.pairs_dataset`), so each
    training batch holds whole candidate lists for the listwise terms.
    """
    import ray
    import ray.data
    from ray.data import ActorPoolStrategy

    from .prompts import document_text

    gpus = cfg.teacher_gpus if cfg.use_gpu and ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    queries = pools_table(cfg, data, checkpoint, cpus, gpus)
    # The sampler actors get the texts of pooled documents only, not the corpus.
    pooled = {did for pool in queries.column("pool").to_pylist() for did in pool}
    documents = {did: document_text(data.corpus[did].title, data.corpus[did].text) for did in sorted(pooled)}
    qrels = {qid: dict(data.qrels.get(qid, {})) for qid in queries.column("query_id").to_pylist()}
    drawn = ray.data.from_arrow(queries).map_batches(
        StudentSampler,
        fn_constructor_kwargs={
            "cfg": cfg,
            "checkpoint": checkpoint,
            "documents": documents,
            "qrels": qrels,
            "round_index": round_index,
        },
        batch_size=64,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=1, max_size=cfg.teacher_actors),
        num_cpus=cpus,
        num_gpus=gpus,
    )
    table = pa.concat_tables(ray.get(drawn.to_arrow_refs())).cast(PAIR_SCHEMA)
    return table.sort_by([("query_id", "ascending"), ("doc_id", "ascending")])
