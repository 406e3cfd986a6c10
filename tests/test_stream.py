"""The readers and pair builders run in Ray (`data.read_beir_dataset`, `data.run_pairs`) against the same code run
in this process (`data.read_beir`, `data.build_pairs`) on the same files."""

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import BROKEN_CORPUS, BROKEN_QRELS, INSTRUCTIONS, SKILLS, write_beir, write_broken_beir

from rabtriever_ray.data import (
    DataError,
    build_pairs,
    read_beir,
    read_beir_dataset,
    read_corpus_dataset,
    run_pairs,
    run_subset,
    sample_queries,
    sample_query_ids,
)
from rabtriever_ray.data.files import plan_shards, read_shard
from rabtriever_ray.data.tasks import RayTasks
from rabtriever_ray.prompts import document_text


def rows(dataset, key):
    return {row[key]: row for row in dataset.take_all()}


def rejects_of(bad_rows):
    return [(r.file.rsplit("/", 1)[-1], r.line, r.field, r.reason) for r in bad_rows]


def test_reads_what_the_in_process_reader_reads(ray_local, tmp_path):
    root = write_beir(tmp_path / "d")
    expected = read_beir(root, "test")
    got = read_beir_dataset(root, "test", cpus=0.25)
    corpus = rows(got.corpus, "doc_id")
    assert {d: r["doc_text"] for d, r in corpus.items()} == {
        d: document_text(doc.title, doc.text) for d, doc in expected.corpus.items()
    }
    assert {q: r["query_text"] for q, r in rows(got.queries, "query_id").items()} == {
        q: query.text for q, query in expected.queries.items()
    }
    qrels = {(r["query_id"], r["doc_id"]): r["grade"] for r in got.qrels.take_all()}
    assert qrels == {(q, d): g for q, judged in expected.qrels.items() for d, g in judged.items()}
    assert got.counts == {"documents": len(SKILLS), "queries": len(INSTRUCTIONS), "qrels": len(INSTRUCTIONS)}
    assert got.rejects == []


def test_skip_policy_rejects_what_the_in_process_reader_rejects(ray_local, tmp_path):
    root = write_broken_beir(tmp_path / "broken")
    expected = read_beir(root, "test", on_bad_row="skip")
    got = read_beir_dataset(root, "test", on_bad_row="skip", cpus=0.25)
    assert rejects_of(got.rejects) == rejects_of(expected.rejects)
    assert [r.raw for r in got.rejects[:3]] == [r.raw for r in expected.rejects[:3]]
    corpus = rows(got.corpus, "doc_id")
    assert sorted(corpus) == sorted(expected.corpus) and corpus["pick_cup"]["doc_text"].startswith(
        "Pick up the cup"
    )
    assert sorted(rows(got.queries, "query_id")) == sorted(expected.queries)
    assert got.reject_counts() == expected.reject_counts()


@pytest.mark.parametrize(
    "keyword, lines, message",
    [
        ("extra_corpus_lines", BROKEN_CORPUS[:1], r"corpus.jsonl:7: field '<json>': malformed JSON"),
        (
            "extra_corpus_lines",
            BROKEN_CORPUS[3:4],
            r"corpus.jsonl:7: field '_id': duplicate id 'pick_cup' \(first on line 1\)",
        ),
        ("extra_qrel_lines", BROKEN_QRELS[1:2], r"test.tsv:7: field 'query-id': unknown query 'q99'"),
        (
            "extra_qrel_lines",
            BROKEN_QRELS[:1],
            r"test.tsv:7: field 'corpus-id': unknown document 'no_such_doc'",
        ),
        (
            "extra_qrel_lines",
            ["q1\twipe_table\t1", "q1\twipe_table\t3"],
            r"test.tsv:8: field 'score': query 'q1' and document 'wipe_table' are judged 1 on line 2 and 3 here",
        ),
    ],
)
def test_fail_policy_names_file_line_and_field(ray_local, tmp_path, keyword, lines, message):
    root = write_beir(tmp_path / "d", **{keyword: lines})
    with pytest.raises(DataError, match=message):
        read_beir_dataset(root, "test", cpus=0.25)


def test_byte_ranges_keep_exact_line_numbers(ray_local, tmp_path):
    """A file read in many small byte ranges: every line read once, numbered as a plain reader numbers it."""
    lines = [json.dumps({"_id": f"d{i}", "text": "x" * (1 + i % 37)}) for i in range(300)]
    lines[123] = '{"_id": "bad", "text": '
    path = tmp_path / "corpus.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode() + b"\r\n")  # a BOM and CRLF endings
    shards = plan_shards("corpus", [path], RayTasks(), range_bytes=257)
    assert len(shards) > 20
    read = [read_shard(s) for s in shards]
    table = pa.concat_tables([good for good, _ in read])
    bad = [row for _, rejected in read for row in rejected]
    assert table.column("_line").to_pylist() == [n for n in range(1, 301) if n != 124]
    assert table.column("doc_id").to_pylist()[:2] == ["d0", "d1"]  # the BOM does not reach the first id
    assert [(b["line"], b["field"], b["raw"]) for b in bad] == [(124, "<json>", lines[123])]


def test_shards_gzip_and_parquet_with_duplicates_across_files(ray_local, tmp_path):
    folder = tmp_path / "d" / "corpus"
    folder.mkdir(parents=True)
    with gzip.open(folder / "part-0.jsonl.gz", "wt") as handle:
        handle.write("\n".join(json.dumps({"_id": f"a{i}", "text": f"doc a{i}"}) for i in range(5)) + "\n")
    pq.write_table(
        pa.table(
            {"_id": ["b0", "a3", "b1"], "title": ["T", None, "U"], "text": ["doc b0", "again", "doc b1"]}
        ),
        folder / "part-1.parquet",
    )
    corpus, count, bad = read_corpus_dataset(tmp_path / "d", on_bad_row="skip", cpus=0.25)
    assert count == 7 and sorted(rows(corpus, "doc_id")) == ["a0", "a1", "a2", "a3", "a4", "b0", "b1"]
    assert rows(corpus, "doc_id")["b0"]["doc_text"] == document_text("T", "doc b0")
    assert [(r.file.rsplit("/", 1)[-1], r.line, r.field) for r in bad] == [("part-1.parquet", 2, "_id")]
    assert "first at" in bad[0].reason and "part-0.jsonl.gz:4" in bad[0].reason
    with pytest.raises(DataError, match=r"part-1.parquet:2: field '_id': duplicate id 'a3'"):
        read_corpus_dataset(tmp_path / "d", cpus=0.25)


def write_run(path, entries):
    path.write_text("".join(f"{q} Q0 {d} {rank} {10 - rank} test\n" for q, d, rank in entries))
    return path


@pytest.mark.parametrize("training", [False, True])
def test_run_pairs_match_build_pairs(ray_local, tmp_path, training):
    unjudged = json.dumps({"_id": "q_unjudged", "text": "Put the kettle on"})  # a query outside the split
    root = write_beir(tmp_path / "d", extra_query_lines=[unjudged])
    run = write_run(
        tmp_path / "run.trec",
        [("q1", "pick_cup", 1), ("q1", "wipe_table", 2), ("q1", "pick_cup", 3), ("q2", "close_door", 1)]
        + [("q3", d, r) for r, d in enumerate(["stack_blocks", "open_drawer", "pour_water"], start=1)]
        + [("q_unjudged", "pick_cup", 1)],
    )
    expected = build_pairs(read_beir(root, "test"), str(run), training=training)
    data = read_beir_dataset(root, "test", cpus=0.25)
    pairs, counts = run_pairs(data, run, training=training, cpus=0.25)
    got = pa.Table.from_pylist(pairs.take_all())
    key = ["query_id", "doc_id", "label", "query_text", "doc_text"]
    as_set = lambda t: {tuple(row[k] for k in key) for row in t.to_pylist()}  # noqa: E731
    assert as_set(got) == as_set(expected) and len(got) == len(expected)
    assert counts == {"pairs": len(expected), "queries": len(INSTRUCTIONS)}
    if training:  # each query's list whole, in one block, in rank order
        seen = set()
        for block in pairs.iter_batches(batch_size=None, batch_format="pyarrow"):
            ids = block.column("query_id").to_pylist()
            for query_id in set(ids):
                at = [i for i, x in enumerate(ids) if x == query_id]
                assert at == list(range(at[0], at[-1] + 1)) and query_id not in seen
                seen.add(query_id)
        q3 = [r["doc_id"] for r in got.to_pylist() if r["query_id"] == "q3"]
        assert q3 == [r["doc_id"] for r in expected.to_pylist() if r["query_id"] == "q3"]


def test_run_naming_an_unknown_document_or_query_is_an_error_with_its_line(ray_local, tmp_path):
    root = write_beir(tmp_path / "d")
    data = read_beir_dataset(root, "test", cpus=0.25)
    run = write_run(tmp_path / "run.trec", [("q1", "pick_cup", 1), ("q2", "no_such_doc", 1)])
    with pytest.raises(DataError, match=r"run.trec:2: field 'docid': unknown document 'no_such_doc'"):
        run_pairs(data, run, cpus=0.25)
    run = write_run(tmp_path / "run.trec", [("q1", "pick_cup", 1), ("q1", "wipe_table", 2), ("Q2", "pick_cup", 1)])
    with pytest.raises(DataError, match=r"run.trec:3: field 'qid': unknown query 'Q2'"):
        run_pairs(data, run, cpus=0.25)
    (tmp_path / "bad.trec").write_text("q1 Q0 pick_cup first 1.0 t\n")
    with pytest.raises(DataError, match=r"bad.trec:1: field 'rank': not a number"):
        run_pairs(read_beir_dataset(root, "test", cpus=0.25), tmp_path / "bad.trec", cpus=0.25)


def test_max_queries_is_a_seeded_sample(ray_local, tmp_path):
    data = read_beir_dataset(write_beir(tmp_path / "d"), "test", cpus=0.25)
    chosen = [
        sorted(row["query_id"] for row in sample_queries(data.queries, 3, seed).take_all())
        for seed in (0, 0, 1, 2)
    ]
    assert all(len(c) == 3 for c in chosen) and chosen[0] == chosen[1]
    assert len({tuple(c) for c in chosen}) > 1  # another seed, another sample
    assert sample_queries(data.queries, 5) is data.queries
    # The same sample as the in-process one over the same ids, whatever their order.
    ids = [row["query_id"] for row in data.queries.take_all()]
    for seed in (0, 1, 2):
        assert chosen[seed + 1 if seed else 0] == sorted(sample_query_ids(ids[::-1], 3, seed))


def test_run_subset_holds_only_what_the_pairs_name(ray_local, tmp_path):
    root = write_beir(tmp_path / "d")
    run = write_run(
        tmp_path / "run.trec", [("q1", "pick_cup", 1), ("q1", "wipe_table", 2), ("q2", "close_door", 1)]
    )
    data, pairs = run_subset(root, "test", run)
    assert sorted(data.corpus) == ["close_door", "pick_cup", "wipe_table"]
    # Every query of the split stays (one the run lists nothing for scores 0), with its qrels.
    assert list(data.queries) == sorted(INSTRUCTIONS)
    assert data.qrels == {q: {doc: 1} for q, (_, doc) in INSTRUCTIONS.items()}
    assert data.queries["q3"].text == INSTRUCTIONS["q3"][0]
    assert pairs.column("label").to_pylist() == [0, 1, 0]  # sorted by query, then document
    doc = data.corpus["pick_cup"]
    assert document_text(doc.title, doc.text) == document_text(*SKILLS["pick_cup"])
    sampled, sampled_pairs = run_subset(root, "test", run, max_queries=2, seed=1)
    assert len(sampled.queries) == 2 and set(sampled.qrels) == set(sampled.queries)
    assert set(sampled_pairs.column("query_id").to_pylist()) <= set(sampled.queries)
