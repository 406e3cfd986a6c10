"""On-policy rounds: the sampler draws from the student's own softmax, deterministically per query."""

import pyarrow as pa
import pytest
import torch

from rabtriever_ray.config import ConfigError, DistillConfig, load_config
from rabtriever_ray.data import DEMO_DATA, PAIR_SCHEMA, read_beir
from rabtriever_ray.prompts import document_text
from rabtriever_ray.rounds import (
    RoundSampler,
    gumbel_top_k,
    query_generator,
    round_pools,
    sample_round_pairs,
    sample_round_stream,
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


def _lists(pools: pa.Table) -> dict[str, tuple[str, list[str], list[str]]]:
    """Each query's text, pool (its candidate list, in order) and positives, from pools as pairs."""
    lists: dict[str, tuple[str, list[str], list[str]]] = {}
    for row in pools.to_pylist():
        _, pool, positives = lists.setdefault(row["query_id"], (row["query_text"], [], []))
        pool.append(row["doc_id"])
        if row["label"] > 0:
            positives.append(row["doc_id"])
    return lists


def _demo_pools(cfg: DistillConfig) -> tuple[pa.Table, dict[str, str], dict[str, dict[str, int]]]:
    """The demo's training pools under ``cfg`` (`round_pools`), every document's text and the pools' qrels."""
    data = read_beir(DEMO_DATA, "train")
    pools = round_pools(cfg, data)
    documents = {d: document_text(doc.title, doc.text) for d, doc in data.corpus.items()}
    qrels = {q: dict(data.qrels[q]) for q in _lists(pools)}
    return pools, documents, qrels


def test_sampler_draws_k_from_the_pool_plus_positives_and_is_batch_independent(checkpoint):
    student, directory = checkpoint
    cfg = _config("round_k=2", "round_tau=1.0")
    pools, documents, qrels = _demo_pools(cfg)
    lists = _lists(pools)
    assert len(lists) == 6
    sampler = RoundSampler(cfg, directory, round_index=1)
    whole = sampler(pools)
    # Blocks cut between queries draw what one block does: the draw does not depend on the batching.
    cut = sum(len(pool) for _, pool, _ in list(lists.values())[:3])
    assert [
        *sampler(pools.slice(0, cut)).to_pylist(),
        *sampler(pools.slice(cut)).to_pylist(),
    ] == whole.to_pylist()
    drawn: dict[str, list[str]] = {}
    for row in whole.to_pylist():
        drawn.setdefault(row["query_id"], []).append(row["doc_id"])
        assert row["doc_id"] in lists[row["query_id"]][1] and row["doc_text"] == documents[row["doc_id"]]
        assert row["label"] == qrels[row["query_id"]].get(row["doc_id"], 0)
    assert list(drawn) == list(lists)  # query by query, in the order given
    for qid, docs in drawn.items():
        positives = [d for d, g in qrels[qid].items() if g > 0]
        assert len(set(docs)) == len(docs) and set(positives) <= set(docs)
        assert 2 <= len(docs) <= 2 + len(positives)
    # Another round draws again (a different seed stream), from the same student.
    other = RoundSampler(cfg, directory, round_index=2)(pools)
    assert other.to_pylist() != whole.to_pylist()


def test_sampler_at_low_temperature_takes_the_students_own_top_k(checkpoint):
    student, directory = checkpoint
    cfg = _config("round_k=3", "round_tau=0.0001")
    pools, documents, _ = _demo_pools(cfg)
    rows = RoundSampler(cfg, directory, round_index=1)(pools).to_pylist()
    for qid, (text, pool, positives) in _lists(pools).items():
        with torch.no_grad():
            scores = student.score_matrix(
                student.encode_queries([text]), student.encode_documents([documents[d] for d in pool])
            )[0]
        top = {pool[i] for i in scores.topk(3).indices.tolist()}
        assert {r["doc_id"] for r in rows if r["query_id"] == qid} == top | set(positives)


def _by_query(rows) -> dict[str, list[tuple]]:
    out: dict[str, list[tuple]] = {}
    for row in rows:
        out.setdefault(row["query_id"], []).append(tuple(row[c] for c in PAIR_SCHEMA.names))
    return {qid: sorted(pairs) for qid, pairs in out.items()}


@pytest.mark.slow  # a round drawn in Ray Data and in process, once per pool
@pytest.mark.parametrize("pool", ["student:5", "run"])
def test_streamed_rounds_draw_the_in_process_pairs_whole_lists_per_block(
    ray_local, checkpoint, tmp_path, pool
):
    """`sample_round_stream` (pools joined in Ray, drawn block by block) draws the pairs `sample_round_pairs` draws
    from the same pools, and never splits a query's pairs between blocks."""
    from ray.train import Checkpoint

    from rabtriever_ray.data import build_pairs, read_beir_dataset

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
    # Both paths sample the same 6 queries (max_train_queries=6); small teacher batches: several blocks.
    cfg = _config(f"round_pool={pool}", "round_k=2", "teacher_batch_size=8")
    student = Checkpoint.from_directory(directory)
    expected = sample_round_pairs(cfg, data, student, round_index=1, cpus=0.5)
    beir = read_beir_dataset(DEMO_DATA, "train", cpus=0.25)
    drawn, counts = sample_round_stream(cfg, beir, student, round_index=1, cpus=0.5, min_partitions=4)
    rows = drawn.take_all()
    assert counts == {"pairs": len(rows), "queries": 6}
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

    def kept_pools(*args, **kwargs):
        pools.append(round_pools(*args, **kwargs))
        return pools[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rounds, "round_pools", kept_pools)
        pairs = sample_round_pairs(cfg, data, Checkpoint.from_directory(directory), round_index=1, cpus=0.5)
    return cfg, data, pools[0], pairs


def test_student_pools_are_the_first_stage_top_k_plus_positives(student_round, checkpoint):
    student, _ = checkpoint
    _, data, pools, _ = student_round
    lists = _lists(pools)
    assert len(lists) == 6
    # The plain reference: every query against every document in this process, best first.
    doc_ids = list(data.corpus)
    with torch.no_grad():
        query_texts = [text for text, _, _ in lists.values()]
        query_vectors = student.embed_queries(student.encode_queries(query_texts))
        doc_vectors = student.embed_documents(
            student.encode_documents([document_text(d.title, d.text) for d in data.corpus.values()])
        )
        reference = query_vectors @ doc_vectors.T
    for (qid, (_, pool, pool_positives)), scores in zip(lists.items(), reference):
        positives = [d for d, grade in data.qrels[qid].items() if grade > 0]
        retrieved = pool[:5]
        assert pool_positives == positives and positives
        assert pool == retrieved + [d for d in positives if d not in retrieved]
        assert len(set(retrieved)) == 5
        # The student's top 5 in its order (a near-tie at the 5th place may swap within float32 rounding).
        got = scores[[doc_ids.index(d) for d in retrieved]]
        torch.testing.assert_close(got, scores.topk(5).values, atol=1e-5, rtol=0)


def test_student_pools_draw_the_same_pairs_for_the_same_seed(student_round, checkpoint):
    _, directory = checkpoint
    cfg, data, pools, pairs = student_round
    # The pairs drawn on Ray are the ones this process draws from the same pools with the same seed and round
    # (sorted by query, as sample_round_pairs returns them).
    in_process = RoundSampler(cfg, directory, round_index=1)(pools)
    assert (
        pairs.to_pylist()
        == in_process.sort_by([("query_id", "ascending"), ("doc_id", "ascending")]).to_pylist()
    )
    drawn: dict[str, set[str]] = {}
    for row in pairs.to_pylist():
        drawn.setdefault(row["query_id"], set()).add(row["doc_id"])
    for qid, (_, pool, positives) in _lists(pools).items():
        assert set(positives) <= drawn[qid] <= set(pool) and 2 <= len(drawn[qid]) <= 2 + len(positives)


@pytest.mark.parametrize(
    "spec, message",
    [("student:0", "K must be >= 1"), ("student:-2", "K must be >= 1"), ("student:x", "integer K")],
)
def test_a_bad_student_pool_is_refused_naming_the_option(spec, message):
    with pytest.raises(ConfigError, match=rf"round_pool '{spec}': .*{message}"):
        _config(f"round_pool={spec}")


def test_student_pools_need_a_student():
    assert _config("round_pool=student:7").round_pool_spec.k == 7
    with pytest.raises(
        ValueError, match="round_pool 'student:5' .* needs the checkpoint of the round before"
    ):
        round_pools(_config("round_pool=student:5"), read_beir(DEMO_DATA, "train"))
