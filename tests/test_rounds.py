"""On-policy rounds: the sampler draws from the student's own softmax, deterministically per query."""

import pyarrow as pa
import pytest
import torch

from rabtriever_ray.config import ConfigError, DistillConfig, load_config
from rabtriever_ray.data import DEMO_DATA, read_beir
from rabtriever_ray.data.candidates import PAIR_SCHEMA
from rabtriever_ray.prompts import document_text
from rabtriever_ray.rounds import (
    ListSampler,
    StudentSampler,
    gumbel_top_k,
    pools_table,
    query_generator,
    sample_round_pairs,
    sample_round_stream,
    student_pool_size,
)
from rabtriever_ray.student import Rabtriever


def test_gumbel_top_k_draws_distinct_indices_from_the_softmax():
    scores = torch.tensor([2.0, 1.0, 0.0, -1.0])
    generator = torch.Generator().manual_seed(0)
    draws = [gumbel_top_k(scores, 2, 1.0, generator) for _ in range(4000)]
    assert all(len(set(d)) == 2 for d in draws)
    # The first index drawn follows softmax(scores / tau).
    first = torch.bincount(torch.tensor([d[0] for d in draws]), minlength=4).float() / len(draws)
    torch.testing.assert_close(first, torch.softmax(scores, 0), atol=0.03, rtol=0)
    # A low temperature draws the top k; k >= n takes everything.
    assert gumbel_top_k(scores, 2, 1e-4, generator) == [0, 1]
    assert sorted(gumbel_top_k(scores, 9, 1.0, generator)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="tau"):
        gumbel_top_k(scores, 2, 0.0, generator)


def test_query_generator_depends_on_seed_round_and_query_only():
    a = torch.rand(3, generator=query_generator(0, 1, "q1"))
    torch.testing.assert_close(a, torch.rand(3, generator=query_generator(0, 1, "q1")))
    assert not torch.equal(a, torch.rand(3, generator=query_generator(0, 2, "q1")))
    assert not torch.equal(a, torch.rand(3, generator=query_generator(0, 1, "q2")))


def _config(*extra):
    return load_config(
        DistillConfig,
        None,
        [
            "teacher=tiny-random-llama",
            "max_train_queries=6",
            "round_pool=bm25:6",
            "student.predictor_hidden=32",
            "teacher.prompt.max_query_tokens=32",
            "teacher.prompt.max_doc_tokens=48",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def checkpoint(tiny_teacher, tmp_path_factory):
    """A tiny student with a perturbed (non-zero) predictor and first-stage projections (not their seeded
    initialisation: whoever scores with them must have read the checkpoint), saved as a checkpoint directory."""
    student = Rabtriever(tiny_teacher, _config().student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.5)
    directory = tmp_path_factory.mktemp("rounds") / "ckpt"
    student.save_trainable(directory, teacher="tiny-random-llama")
    return student, str(directory)


def _demo_pools(cfg: DistillConfig) -> tuple[pa.Table, dict[str, str], dict[str, dict[str, int]]]:
    """The demo's training pools under ``cfg`` (`pools_table`), every document's text and the pools' qrels."""
    data = read_beir(DEMO_DATA, "train")
    queries = pools_table(cfg, data)
    documents = {d: document_text(doc.title, doc.text) for d, doc in data.corpus.items()}
    qrels = {q: dict(data.qrels[q]) for q in queries.column("query_id").to_pylist()}
    return queries, documents, qrels


def test_sampler_draws_k_from_the_pool_plus_positives_and_is_batch_independent(checkpoint):
    student, directory = checkpoint
    cfg = _config("round_k=2", "round_tau=1.0")
    queries, documents, qrels = _demo_pools(cfg)
    assert queries.num_rows == 6
    sampler = StudentSampler(cfg, directory, documents, qrels, round_index=1)
    whole = sampler(queries)
    halves = pa.concat_tables([sampler(queries.slice(0, 3)), sampler(queries.slice(3))])
    assert whole.to_pylist() == halves.to_pylist()  # the draw does not depend on the batching
    pools = dict(zip(queries.column("query_id").to_pylist(), queries.column("pool").to_pylist()))
    drawn: dict[str, list[str]] = {}
    for row in whole.to_pylist():
        drawn.setdefault(row["query_id"], []).append(row["doc_id"])
        assert row["doc_id"] in pools[row["query_id"]] and row["doc_text"] == documents[row["doc_id"]]
        assert row["label"] == qrels[row["query_id"]].get(row["doc_id"], 0)
    for qid, docs in drawn.items():
        positives = [d for d, g in qrels[qid].items() if g > 0]
        assert len(set(docs)) == len(docs) and set(positives) <= set(docs)
        assert 2 <= len(docs) <= 2 + len(positives)
    # Another round draws again (a different seed stream), from the same student.
    other = StudentSampler(cfg, directory, documents, qrels, round_index=2)(queries)
    assert other.to_pylist() != whole.to_pylist()


def test_sampler_at_low_temperature_takes_the_students_own_top_k(checkpoint):
    student, directory = checkpoint
    cfg = _config("round_k=3", "round_tau=0.0001")
    queries, documents, _ = _demo_pools(cfg)
    out = StudentSampler(cfg, directory, documents, {}, round_index=1)(queries)
    rows = out.to_pylist()
    for qid, text, pool, positives in zip(
        queries.column("query_id").to_pylist(),
        queries.column("query_text").to_pylist(),
        queries.column("pool").to_pylist(),
        queries.column("positives").to_pylist(),
    ):
        with torch.no_grad():
            scores = student.score_matrix(
                student.encode_queries([text]), student.encode_documents([documents[d] for d in pool])
            )[0]
        top = {pool[i] for i in scores.topk(3).indices.tolist()}
        assert {r["doc_id"] for r in rows if r["query_id"] == qid} == top | set(positives)


def _pair_block(queries: pa.Table, documents: dict, qrels: dict) -> pa.Table:
    """The pools as `join_pairs` hands them to the streamed rounds: each query's pool as pairs, in pool order."""
    rows = [
        {
            "query_id": qid,
            "doc_id": did,
            "label": qrels.get(qid, {}).get(did, 0),
            "query_text": text,
            "doc_text": documents[did],
        }
        for qid, text, pool in zip(
            *(queries.column(c).to_pylist() for c in ("query_id", "query_text", "pool"))
        )
        for did in pool
    ]
    return pa.Table.from_pylist(rows, schema=PAIR_SCHEMA)


def test_list_sampler_draws_what_the_pool_sampler_draws(checkpoint):
    _, directory = checkpoint
    cfg = _config("round_k=2", "round_tau=1.0")
    queries, documents, qrels = _demo_pools(cfg)
    expected = StudentSampler(cfg, directory, documents, qrels, round_index=1)(queries).to_pylist()
    block = _pair_block(queries, documents, qrels)
    sampler = ListSampler(cfg, directory, round_index=1)
    assert sampler(block).to_pylist() == expected
    # Blocks that split between queries draw what one block does.
    cut = sum(len(pool) for pool in queries.column("pool").to_pylist()[:3])
    assert [*sampler(block.slice(0, cut)).to_pylist(), *sampler(block.slice(cut)).to_pylist()] == expected


def _by_query(rows) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for row in rows:
        out.setdefault(row["query_id"], []).append(tuple(row[c] for c in PAIR_SCHEMA.names))
    return {qid: sorted(pairs) for qid, pairs in out.items()}


@pytest.mark.parametrize("pool", ["student:5", "run"])
def test_streamed_rounds_draw_the_in_process_pairs_whole_lists_per_block(
    ray_local, checkpoint, tmp_path, pool
):
    """`sample_round_stream` (pools joined in Ray, drawn block by block) draws the pairs `sample_round_pairs` draws
    from the same pools, and never splits a query's pairs between blocks."""
    from ray.train import Checkpoint

    from rabtriever_ray.data import build_pairs
    from rabtriever_ray.data.stream import read_beir_dataset

    _, directory = checkpoint
    data = read_beir(DEMO_DATA, "train")
    if pool == "run":  # each query's BM25 top 6, as a TREC run
        run = tmp_path / "pool.trec"
        lines, ranks = [], {}
        for row in build_pairs(data, "bm25:6").to_pylist():
            ranks[row["query_id"]] = ranks.get(row["query_id"], 0) + 1
            lines.append(f"{row['query_id']} Q0 {row['doc_id']} {ranks[row['query_id']]} 0 bm25")
        run.write_text("\n".join(lines) + "\n")
        pool = str(run)
    # Every query (the two paths sample max_train_queries differently), small teacher batches: several blocks.
    cfg = _config(f"round_pool={pool}", "round_k=2", "teacher_batch_size=8", "max_train_queries=1000")
    student = Checkpoint.from_directory(directory)
    expected = sample_round_pairs(cfg, data, student, round_index=1, cpus=0.5)
    beir = read_beir_dataset(DEMO_DATA, "train", cpus=0.25)
    drawn, counts = sample_round_stream(cfg, beir, student, round_index=1, cpus=0.5, min_partitions=4)
    rows = drawn.take_all()
    assert counts == {"pairs": len(rows), "queries": len(data.queries)}
    assert _by_query(rows) == _by_query(expected.to_pylist())
    blocks = [set(ray_local.get(ref).column("query_id").to_pylist()) for ref in drawn.to_arrow_refs()]
    assert len(blocks) > 1 and sum(len(b) for b in blocks) == len(set().union(*blocks))


# -- student:K pools: the previous round's student's own first stage over the whole corpus -------------------


@pytest.fixture(scope="module")
def student_round(ray_local, checkpoint):
    """Round 1 with ``round_pool=student:5`` on Ray, as the distillation runs it (from a Ray Train checkpoint):
    (config, data, the pools the round drew from, the drawn pairs)."""
    from ray.train import Checkpoint

    from rabtriever_ray import rounds

    _, directory = checkpoint
    cfg = _config("round_pool=student:5", "round_k=2", "teacher_batch_size=8")  # 30 documents, 4 blocks
    data = read_beir(DEMO_DATA, "train")
    pools = []

    def kept_pools_table(*args, **kwargs):
        pools.append(pools_table(*args, **kwargs))
        return pools[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rounds, "pools_table", kept_pools_table)
        pairs = sample_round_pairs(cfg, data, Checkpoint.from_directory(directory), round_index=1, cpus=0.5)
    return cfg, data, pools[0], pairs


def test_student_pools_are_the_first_stage_top_k_plus_positives(student_round, checkpoint):
    student, _ = checkpoint
    _, data, queries, _ = student_round
    assert queries.num_rows == 6
    # The plain reference: every query against every document in this process, best first.
    doc_ids = list(data.corpus)
    with torch.no_grad():
        reference = student.first_stage_scores(
            student.encode_queries(queries.column("query_text").to_pylist()),
            student.encode_documents([document_text(d.title, d.text) for d in data.corpus.values()]),
        )
    for row, scores in zip(queries.to_pylist(), reference):
        positives = [d for d, grade in data.qrels[row["query_id"]].items() if grade > 0]
        retrieved = row["pool"][:5]
        assert row["positives"] == positives and positives
        assert row["pool"] == retrieved + [d for d in positives if d not in retrieved]
        assert len(set(retrieved)) == 5
        # The student's top 5 in its order (a near-tie at the 5th place may swap within float32 rounding).
        got = scores[[doc_ids.index(d) for d in retrieved]]
        torch.testing.assert_close(got, scores.topk(5).values, atol=1e-5, rtol=0)


def test_student_pools_draw_the_same_pairs_for_the_same_seed(student_round, checkpoint):
    _, directory = checkpoint
    cfg, data, pools, pairs = student_round
    documents = {d: document_text(doc.title, doc.text) for d, doc in data.corpus.items()}
    qrels = {q: dict(data.qrels[q]) for q in pools.column("query_id").to_pylist()}
    # The pairs drawn on Ray are the ones this process draws from the same pools with the same seed and round
    # (sorted by query, as sample_round_pairs returns them).
    in_process = StudentSampler(cfg, directory, documents, qrels, round_index=1)(pools)
    assert (
        pairs.to_pylist()
        == in_process.sort_by([("query_id", "ascending"), ("doc_id", "ascending")]).to_pylist()
    )
    drawn: dict[str, set[str]] = {}
    for row in pairs.to_pylist():
        drawn.setdefault(row["query_id"], set()).add(row["doc_id"])
    for qid, pool, positives in zip(
        *(pools.column(c).to_pylist() for c in ("query_id", "pool", "positives"))
    ):
        assert set(positives) <= drawn[qid] <= set(pool) and 2 <= len(drawn[qid]) <= 2 + len(positives)


@pytest.mark.parametrize(
    "spec, message",
    [("student:0", "K must be >= 1"), ("student:-2", "K must be >= 1"), ("student:x", "integer K")],
)
def test_a_bad_student_pool_is_refused_naming_the_option(spec, message):
    with pytest.raises(ConfigError, match=rf"round_pool '{spec}': .*{message}"):
        _config(f"round_pool={spec}")
    with pytest.raises(ConfigError, match=message):
        student_pool_size(spec)


def test_student_pools_need_a_student():
    assert student_pool_size("student:7") == 7 and student_pool_size("bm25:7") is None
    with pytest.raises(
        ValueError, match="round_pool 'student:5' .* needs the checkpoint of the round before"
    ):
        pools_table(_config("round_pool=student:5"), read_beir(DEMO_DATA, "train"))
