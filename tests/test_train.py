import pytest
import torch
from helpers import DOCUMENTS, QUERIES

from rabtriever_ray.config import LossConfig, StudentConfig
from rabtriever_ray.distill_loop import EmbeddingCache, distill_losses, group_by_query
from rabtriever_ray.losses import jepa_loss, listwise_kl, reverse_kl
from rabtriever_ray.student import Rabtriever
from rabtriever_ray.teacher_batches import TeacherStream, teacher_batch_tensors


@pytest.fixture
def student(tiny_teacher):
    return Rabtriever(tiny_teacher, StudentConfig(predictor_hidden=64, proj_dim=16))


@pytest.fixture(scope="module")
def batch(tiny_teacher):
    """Every query against every document, with the tiny teacher's outputs."""
    queries = [q for q in QUERIES for _ in DOCUMENTS]
    documents = [d for _ in QUERIES for d in DOCUMENTS]
    out = tiny_teacher.score(queries, documents)
    query_ids = [f"q{i}" for i in range(len(QUERIES)) for _ in DOCUMENTS]
    return queries, documents, query_ids, out


def test_embedding_cache_encodes_each_text_once(student):
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return student.encode_queries(texts)

    cache = EmbeddingCache(encode)
    first = cache([QUERIES[0], QUERIES[1], QUERIES[0]])
    second = cache([QUERIES[1], QUERIES[2]])
    assert calls == [[QUERIES[0], QUERIES[1]], [QUERIES[2]]] and len(cache) == 3
    torch.testing.assert_close(first[0], first[2])
    torch.testing.assert_close(second, student.encode_queries([QUERIES[1], QUERIES[2]]))


def test_embedding_cache_keeps_at_most_its_bytes_dropping_the_least_recently_used():
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return torch.stack([torch.full((4,), float(ord(t[0]))) for t in texts])  # 16 bytes a row

    cache = EmbeddingCache(encode, max_bytes=48)  # three rows
    cache(["a", "b", "c"])
    cache(["a"])  # "a" is now the most recently used
    out = cache(["d"])  # over the budget: "b", the least recently used, goes
    assert len(cache) == 3 and cache.bytes == 48 and out[0, 0] == ord("d")
    torch.testing.assert_close(cache(["a", "c", "d"])[:, 0], torch.tensor([97.0, 99.0, 100.0]))
    assert calls == [["a", "b", "c"], ["d"]]  # nothing re-encoded yet
    rows = cache(["b", "e", "a", "c"])  # a call needs more than the budget: its rows are all kept for it
    assert rows[:, 0].tolist() == [98.0, 101.0, 97.0, 99.0] and calls[-1] == ["b", "e"] and cache.encoded == 6
    assert cache.bytes == 64 and len(cache) == 4  # then trimmed back on the next call
    cache(["a"])
    assert cache.bytes == 48 and "d" not in cache._rows


def test_group_by_query():
    index, mask = group_by_query(["a", "b", "a", "c", "a"])
    assert index.tolist() == [[0, 2, 4], [1, 0, 0], [3, 0, 0]]
    assert mask.tolist() == [[True, True, True], [True, False, False], [True, False, False]]


def _teacher_rows(query_ids: list[str], start: int = 0):
    """Teacher-stage rows with these query ids; ``teacher_score`` numbers the rows from ``start``."""
    import pyarrow as pa

    n = len(query_ids)
    return pa.table(
        {
            "query_id": query_ids,
            "query_text": [f"query {q}" for q in query_ids],
            "doc_text": ["document"] * n,
            "teacher_score": pa.array(range(start, start + n), pa.float32()),
            "teacher_hidden": pa.FixedSizeListArray.from_arrays(pa.array([0.5] * n * 3, pa.float32()), 3),
        }
    )


class _Shard:
    """A Ray Data shard's whole-block ``iter_batches`` over the given blocks."""

    def __init__(self, blocks):
        self.blocks = blocks

    def iter_batches(self, batch_size, batch_format):
        assert batch_size is None and batch_format == "pyarrow"
        return iter(self.blocks)


def test_candidate_lists_group_a_blocks_rows_and_join_a_list_across_blocks():
    from rabtriever_ray.teacher_batches import candidate_lists

    blocks = [_teacher_rows(["a", "b", "a", "c"], 0), _teacher_rows(["c", "d"], 4), _teacher_rows([], 6)]
    blocks.append(_teacher_rows(["e", "d"], 6))
    lists = [
        (t.column("query_id").to_pylist(), t["teacher_score"].to_pylist()) for t in candidate_lists(blocks)
    ]
    # "c" continues into the next block and is joined; "d" after "e" in a later block is a list of its own.
    expected = [
        (["a", "a"], [0, 2]),
        (["b"], [1]),
        (["c", "c"], [3, 4]),
        (["d"], [5]),
        (["e"], [6]),
        (["d"], [7]),
    ]
    assert lists == expected


def test_teacher_stream_batches_whole_candidate_lists_and_trains_on_every_row():
    sizes = [3, 5, 2, 7, 20, 4, 1, 6]  # candidate list sizes; one (20) longer than a batch
    ids = [f"q{i}" for i, size in enumerate(sizes) for _ in range(size)]
    table = _teacher_rows(ids)
    blocks = [table.slice(0, 10), table.slice(10, 24), table.slice(34)]  # "q3" continues across the first cut
    stream = TeacherStream(_Shard(blocks), batch_size=16)
    batches = [teacher_batch_tensors(table) for table in stream]
    assert stream.rows == len(ids)
    seen = [score for b in batches for score in b["teacher_score"].tolist()]
    assert sorted(seen) == list(range(len(ids)))  # every row, once
    for b in batches:
        queries = b["query_id"]
        assert len(queries) <= 16 or len(set(queries)) == 1  # a longer list is a batch of its own
        for q in set(queries):  # each list whole in its batch
            assert queries.count(q) == sizes[int(q[1:])]
    assert [len(b["query_id"]) for b in batches] == [10, 7, 20, 11]
    assert batches[0]["teacher_hidden"].shape == (10, 3)


def test_batch_store_keeps_batches_in_memory_to_its_budget_and_spills_the_rest(tmp_path):
    from rabtriever_ray.teacher_batches import BatchStore

    tables = [_teacher_rows([f"q{i}"] * 5, 5 * i) for i in range(4)]
    store = BatchStore(max_bytes=2 * tables[0].nbytes, directory=tmp_path / "spill")
    for table in tables:
        store.append(table)
    assert len(store) == 4 and store.spilled == 2 and store.bytes == 2 * tables[0].nbytes
    assert sorted(p.name for p in (tmp_path / "spill").iterdir()) == [
        "batch-0000002.arrow",
        "batch-0000003.arrow",
    ]
    for index, table in enumerate(tables):
        assert store[index].equals(table)  # spilled ones read back from disk, the same rows
    torch.testing.assert_close(teacher_batch_tensors(store[3])["teacher_hidden"], torch.full((5, 3), 0.5))


def test_every_worker_takes_the_same_steps_replaying_or_keeping_what_its_shard_holds():
    from rabtriever_ray.teacher_batches import epoch_batches

    generator = torch.Generator().manual_seed(0)
    stored: list = []
    short = list(epoch_batches(stored, iter(["a", "b"]), 5, generator))  # a shard of 2 batches, 5 steps
    assert (
        short[:2] == ["a", "b"] and len(short) == 5 and set(short[2:]) <= {"a", "b"} and stored == ["a", "b"]
    )
    stored = []
    long = list(epoch_batches(stored, iter("abcdefg"), 3, generator))  # 7 batches, 3 steps
    assert long == ["a", "b", "c"] and stored == list("abcdefg")  # the rest is kept for later epochs
    later = [list(epoch_batches(stored, None, 3, generator)) for _ in range(2)]
    assert all(len(epoch) == 3 and len(set(epoch)) == 3 for epoch in later)
    assert (
        len(list(epoch_batches(stored, None, 10, generator))) == 10
    )  # more steps than batches: passes repeat
    with pytest.raises(RuntimeError, match="fewer blocks of candidate lists than workers"):
        list(epoch_batches([], iter([]), 2, generator))


def test_loss_terms_equal_the_pure_functions(student, batch):
    queries, documents, query_ids, out = batch
    with torch.no_grad():
        for p in student.predictor.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    h_q, h_d = student.encode_queries(queries), student.encode_documents(documents)
    config = LossConfig(w_jepa=1.0, w_rkl=0.5, w_list=2.0, w_rank=0.25, temperature=2.0)
    terms = distill_losses(student, student, h_q, h_d, out.hidden, out.score, query_ids, config)
    predicted = student.predict(h_q, h_d)
    assert terms["jepa"].item() == pytest.approx(jepa_loss(predicted, out.hidden).item(), rel=1e-5)
    rkl = reverse_kl(student.head.logits(predicted), student.head.logits(out.hidden), 2.0)
    assert terms["rkl"].item() == pytest.approx(rkl.item(), rel=1e-5)
    n_docs = len(DOCUMENTS)
    teacher_lists = out.score.view(len(QUERIES), n_docs)
    first_stage = student.embed_queries(h_q[::n_docs]) @ student.embed_documents(h_d[:n_docs]).T
    first = first_stage * student.first_stage_scale.exp()
    assert terms["list"].item() == pytest.approx(listwise_kl(first, teacher_lists, 2.0).item(), rel=1e-5)
    rank = listwise_kl(student.head.score(predicted).view(len(QUERIES), n_docs), teacher_lists, 2.0)
    assert terms["rank"].item() == pytest.approx(rank.item(), rel=1e-5)
    expected = terms["jepa"] + 0.5 * terms["rkl"] + 2.0 * terms["list"] + 0.25 * terms["rank"]
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    skipped = distill_losses(
        student, student, h_q, h_d, out.hidden, out.score, query_ids, LossConfig(w_rkl=0.0, w_list=0.0)
    )
    assert skipped["rkl"].item() == skipped["list"].item() == 0.0


def test_a_few_steps_reduce_the_loss_and_train_only_the_student(student, batch):
    queries, documents, query_ids, out = batch
    frozen = {n: p.clone() for n, p in student.teacher.model.named_parameters()}
    query_cache, doc_cache = EmbeddingCache(student.encode_queries), EmbeddingCache(student.encode_documents)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    config = LossConfig(w_rank=1.0)
    history = []
    for _ in range(40):
        terms = distill_losses(
            student,
            student,
            query_cache(queries),
            doc_cache(documents),
            out.hidden,
            out.score,
            query_ids,
            config,
        )
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        history.append(terms["total"].item())
    assert history[-1] < 0.5 * history[0]
    assert len(query_cache) == len(QUERIES) and len(doc_cache) == len(DOCUMENTS)
    for name, param in student.teacher.model.named_parameters():
        assert torch.equal(param, frozen[name]), name


def test_save_and_load_trainable_parts(student, tiny_teacher, tmp_path):
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student.save_trainable(tmp_path / "ckpt", teacher="tiny-random-llama", step=7)
    assert (tmp_path / "ckpt" / "student.safetensors").is_file()
    fresh = Rabtriever(tiny_teacher, student.config)
    info = fresh.load_trainable(tmp_path / "ckpt")
    assert info["teacher"] == "tiny-random-llama" and info["step"] == 7
    for (name, a), (_, b) in zip(student.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    other = Rabtriever(tiny_teacher, StudentConfig(predictor_hidden=8, proj_dim=16))
    with pytest.raises(
        ValueError, match=r"(?s)student\.safetensors does not fit this student.*size mismatch"
    ):
        other.load_trainable(tmp_path / "ckpt")
