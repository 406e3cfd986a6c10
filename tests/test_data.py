import gzip
import json

import pyarrow.compute as pc
import pytest
from helpers import (
    BROKEN_CORPUS,
    BROKEN_QRELS,
    BROKEN_QUERIES,
    INSTRUCTIONS,
    SKILLS,
    write_beir,
    write_broken_beir,
)

from rabtriever_ray.data import (
    PAIR_SCHEMA,
    BM25Index,
    DataError,
    build_pairs,
    read_beir,
    sample_query_ids,
    write_rejects,
)


@pytest.fixture
def clean(tmp_path):
    return write_beir(tmp_path / "clean")


@pytest.fixture
def broken(tmp_path):
    return write_broken_beir(tmp_path / "broken")


@pytest.mark.parametrize("gz", [False, True])
def test_reads_a_clean_folder(tmp_path, gz):
    data = read_beir(write_beir(tmp_path / "d", gz=gz), "test")
    assert list(data.corpus) == list(SKILLS) and list(data.queries) == list(INSTRUCTIONS)
    assert data.corpus["pick_cup"].title == "Pick up the cup"
    assert data.qrels["q1"] == {"wipe_table": 1} and data.rejects == []


def test_split_keeps_only_judged_queries(tmp_path):
    root = write_beir(tmp_path / "d")
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nq1\twipe_table\t1\n")
    assert list(read_beir(root, "test").queries) == ["q1"]
    assert len(read_beir(root).queries) == len(INSTRUCTIONS)
    with pytest.raises(DataError, match=r"no qrels for split 'train'.*available: \['test'\]"):
        read_beir(root, "train")


@pytest.mark.parametrize(
    "file, lines, message",
    [
        ("corpus", BROKEN_CORPUS[:1], r"corpus.jsonl:7: field '<json>': malformed JSON"),
        ("corpus", BROKEN_CORPUS[1:2], r"corpus.jsonl:7: field '_id': missing"),
        ("corpus", BROKEN_CORPUS[2:3], r"corpus.jsonl:7: field 'text': empty document"),
        (
            "corpus",
            BROKEN_CORPUS[3:4],
            r"corpus.jsonl:7: field '_id': duplicate id 'pick_cup' \(first on line 1\)",
        ),
        ("queries", BROKEN_QUERIES[:1], r"queries.jsonl:6: field 'text': empty query text"),
        ("queries", BROKEN_QUERIES[1:2], r"queries.jsonl:6: field 'text': missing"),
        ("queries", BROKEN_QUERIES[2:3], r"queries.jsonl:6: field 'metadata': not a JSON object"),
        ("qrels", BROKEN_QRELS[:1], r"test.tsv:7: field 'corpus-id': unknown document 'no_such_doc'"),
        ("qrels", BROKEN_QRELS[1:2], r"test.tsv:7: field 'query-id': unknown query 'q99'"),
        ("qrels", BROKEN_QRELS[2:3], r"test.tsv:7: field 'score': not an integer"),
        ("corpus", ['{"_id": "d\\ud83d", "text": "x"}'], r"corpus.jsonl:7: field '_id': not valid Unicode"),
        ("queries", ['{"_id": "q9", "text": "hi \\udc00"}'], r"queries.jsonl:6: field 'text': not valid Unicode"),
        ("qrels", ["q1\tpick_cup\t1_0"], r"test.tsv:7: field 'score': not an integer: '1_0'"),
        ("qrels", ["q1\tpick_cup\t-1"], r"test.tsv:7: field 'score': negative grade -1"),
        ("qrels", ["q1\tpick_cup\t300"], r"test.tsv:7: field 'score': grade 300 is over 127"),
        (
            "qrels",
            ["q1\twipe_table\t2"],
            r"test.tsv:7: field 'score': query 'q1' and document 'wipe_table' are judged 1 on line 2 and 2 here",
        ),
    ],
)
def test_fail_policy_names_file_line_and_field(tmp_path, file, lines, message):
    keyword = {"corpus": "extra_corpus_lines", "queries": "extra_query_lines", "qrels": "extra_qrel_lines"}[
        file
    ]
    root = write_beir(tmp_path / "d", **{keyword: lines})
    with pytest.raises(DataError, match=message):
        read_beir(root, "test")


def test_a_pair_judged_twice_with_the_same_grade_is_read_once(tmp_path):
    root = write_beir(tmp_path / "d", extra_qrel_lines=["q1\twipe_table\t1", "q3\twipe_table\t0"])
    data = read_beir(root, "test")
    assert data.qrels["q1"] == {"wipe_table": 1} and data.qrels["q3"] == {"pick_cup": 1, "wipe_table": 0}
    assert data.rejects == []


def test_skip_policy_records_every_bad_row(broken, tmp_path):
    data = read_beir(broken, "test", on_bad_row="skip")
    assert list(data.corpus) == list(SKILLS) and data.corpus["pick_cup"].title == "Pick up the cup"
    assert list(data.queries) == list(INSTRUCTIONS)  # q8 is valid but unjudged in the split
    reasons = [(r.file.rsplit("/", 1)[-1], r.line, r.field) for r in data.rejects]
    assert reasons == [
        ("corpus.jsonl", 7, "<json>"),
        ("corpus.jsonl", 8, "_id"),
        ("corpus.jsonl", 9, "text"),
        ("corpus.jsonl", 10, "_id"),
        ("corpus.jsonl", 11, "<json>"),
        ("queries.jsonl", 6, "text"),
        ("queries.jsonl", 7, "text"),
        ("queries.jsonl", 8, "metadata"),
        ("test.tsv", 7, "corpus-id"),
        ("test.tsv", 8, "query-id"),
        ("test.tsv", 9, "score"),
        ("test.tsv", 10, "<row>"),
    ]
    assert data.reject_counts() == {"corpus.jsonl": 5, "queries.jsonl": 3, "test.tsv": 4}
    path = tmp_path / "rejects.jsonl"
    write_rejects(data.rejects, path)
    first = json.loads(path.read_text().splitlines()[0])
    assert first["line"] == 7 and first["raw"] == BROKEN_CORPUS[0] and "malformed JSON" in first["reason"]


def test_bad_header_and_missing_folder(tmp_path):
    root = write_beir(tmp_path / "d")
    (root / "qrels" / "test.tsv").write_text("qid\tdocid\trel\nq1\twipe_table\t1\n")
    with pytest.raises(DataError, match=r"test.tsv:1: field '<header>'"):
        read_beir(root, "test")
    with pytest.raises(DataError, match="data folder not found"):
        read_beir(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no corpus.jsonl, corpus.jsonl.gz, corpus.parquet or corpus/ folder"):
        read_beir(tmp_path / "empty")


def rewrite_bytes(path, change):
    """Apply ``change`` to the file's bytes (inside the gzip stream for ``.gz``)."""
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(change(gzip.decompress(path.read_bytes()))))
    else:
        path.write_bytes(change(path.read_bytes()))


def beir_files(root):
    return [*sorted(root.glob("*.jsonl*")), root / "qrels" / "test.tsv"]


def same_content(a, b):
    return (a.corpus, a.queries, a.qrels, a.rejects) == (b.corpus, b.queries, b.qrels, b.rejects)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["corpus", "queries", "qrels/test"])
def test_byte_order_mark_is_dropped(tmp_path, name, gz):
    root = write_beir(tmp_path / "d", gz=gz)
    path = next(p for p in beir_files(root) if str(p.relative_to(root)).startswith(name))
    rewrite_bytes(path, lambda data: b"\xef\xbb\xbf" + data)
    data = read_beir(root, "test")
    assert same_content(data, read_beir(write_beir(tmp_path / "plain", gz=gz), "test"))
    assert "pick_cup" in data.corpus and "q1" in data.queries and "q1" in data.qrels


@pytest.mark.parametrize("gz", [False, True])
def test_crlf_folder_reads_like_lf(tmp_path, gz):
    root = write_beir(tmp_path / "crlf", gz=gz)
    for path in beir_files(root):
        rewrite_bytes(path, lambda data: data.replace(b"\n", b"\r\n"))
    assert b"\r\n" in (root / "qrels" / "test.tsv").read_bytes()
    data = read_beir(root, "test")
    assert same_content(data, read_beir(write_beir(tmp_path / "lf", gz=gz), "test"))
    strings = [
        *data.corpus,
        *data.queries,
        *data.qrels,
        *(d for judged in data.qrels.values() for d in judged),
    ]
    strings += [f"{d.title}{d.text}" for d in data.corpus.values()] + [q.text for q in data.queries.values()]
    assert not any("\r" in text for text in strings)


# A Windows-1252 line ("\x8a" is "Š" there, and no UTF-8 start byte), put on line 4 of the file.
CP1252_LINE = b'{"_id": "cp1252", "title": "\x8akoda", "text": "a cp1252 title"}'
CP1252_QREL = b"q1\tpick_cup\x8a\t1"


def insert_line(path, line, at=4):
    def change(data):
        lines = data.split(b"\n")
        return b"\n".join([*lines[: at - 1], line, *lines[at - 1 :]])

    rewrite_bytes(path, change)


@pytest.mark.parametrize(
    "name, gz, line",
    [
        ("corpus.jsonl", False, CP1252_LINE),
        ("corpus.jsonl.gz", True, CP1252_LINE),
        ("test.tsv", False, CP1252_QREL),
    ],
    ids=["corpus", "corpus-gz", "qrels"],
)
def test_undecodable_line_names_file_and_line(tmp_path, name, gz, line):
    root = write_beir(tmp_path / "d", gz=gz)
    insert_line(next(p for p in beir_files(root) if p.name == name), line)
    column = line.index(b"\x8a") + 1
    message = rf"{name}:4: field '<encoding>': not UTF-8: byte 0x8a at byte {column} of the line \(invalid start byte\)"
    with pytest.raises(DataError, match=message):
        read_beir(root, "test")


def test_skip_policy_rejects_undecodable_line_and_reads_on(tmp_path):
    root = write_beir(tmp_path / "d", extra_corpus_lines=BROKEN_CORPUS[:1])  # malformed JSON, line 7
    insert_line(root / "corpus.jsonl", CP1252_LINE)  # the malformed row moves to line 8
    data = read_beir(root, "test", on_bad_row="skip")
    assert data.corpus == read_beir(write_beir(tmp_path / "clean"), "test").corpus
    assert [(r.line, r.field) for r in data.rejects] == [(4, "<encoding>"), (8, "<json>")]
    path = tmp_path / "rejects.jsonl"
    write_rejects(data.rejects, path)
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert (
        first["file"].endswith("corpus.jsonl")
        and first["line"] == 4
        and "invalid start byte" in first["reason"]
    )
    assert first["raw"] == CP1252_LINE.decode("utf-8", "backslashreplace") and "\\x8akoda" in first["raw"]


def test_all_candidates_and_labels(clean):
    data = read_beir(clean, "test")
    pairs = build_pairs(data, "all")
    assert pairs.schema == PAIR_SCHEMA and len(pairs) == len(SKILLS) * len(INSTRUCTIONS)
    rows = pairs.to_pylist()
    positives = {(r["query_id"], r["doc_id"]) for r in rows if r["label"] == 1}
    assert positives == {(q, d) for q, (_, d) in INSTRUCTIONS.items()}
    assert {r["label"] for r in rows} == {0, 1}
    assert rows[0]["doc_text"] == "Pick up the cup\nGrasp a cup by its handle and lift it from the table."
    unjudged = build_pairs(read_beir(clean), "all")  # no split: labels unknown
    assert set(unjudged.column("label").to_pylist()) == {-1}


def test_max_queries_is_a_seeded_subset(clean):
    data = read_beir(clean, "test")
    ids = list(data.queries)
    a, b, c = (
        sample_query_ids(ids, 3, seed=0),
        sample_query_ids(ids, 3, seed=0),
        sample_query_ids(ids, 3, seed=5),
    )
    assert a == b and len(a) == 3 and set(a) <= set(INSTRUCTIONS)
    assert a == [q for q in ids if q in a]  # kept in the order given
    assert sample_query_ids(list(reversed(ids)), 3, seed=0) == list(reversed(a))  # the order does not choose
    assert a != c or sample_query_ids(ids, 3, seed=7) != a
    assert len(build_pairs(data, "all", max_queries=2)) == 2 * len(SKILLS)


def test_bm25_candidates_and_training_positives(clean):
    data = read_beir(clean, "test")
    index = BM25Index(list(data.corpus), [f"{d.title}\n{d.text}" for d in data.corpus.values()])
    hits, scores = index.search(["fill my glass with water"], 2)
    assert hits[0][0] == "pour_water" and scores[0][0] >= scores[0][1]
    plain = build_pairs(data, "bm25:1")
    assert len(plain) == len(INSTRUCTIONS)
    training = build_pairs(data, "bm25:1", training=True)
    per_query = {}
    for row in training.to_pylist():
        per_query.setdefault(row["query_id"], []).append(row["doc_id"])
    for qid, (_, positive) in INSTRUCTIONS.items():
        assert positive in per_query[qid]  # added when BM25 missed it
    missed = sum(
        1
        for q, (_, pos) in INSTRUCTIONS.items()
        if pos
        not in plain.filter(plain.column("query_id").to_numpy(zero_copy_only=False) == q)
        .column("doc_id")
        .to_pylist()
    )
    assert len(training) == len(plain) + missed


def test_random_candidates_are_seeded_per_query_and_keep_training_positives(clean):
    data = read_beir(clean, "test")
    pairs = build_pairs(data, "random:2")
    lists = {}
    for row in pairs.to_pylist():
        lists.setdefault(row["query_id"], []).append(row["doc_id"])
    assert set(lists) == set(INSTRUCTIONS)
    assert all(len(docs) == len(set(docs)) == 2 and set(docs) <= set(SKILLS) for docs in lists.values())
    assert build_pairs(data, "random:2").equals(pairs)  # the same draw on every call
    # A query's draw depends on its id and the seed, not on which other queries are drawn with it.
    alone = build_pairs(data, "random:2", query_ids=["q2"]).column("doc_id").to_pylist()
    assert alone == lists["q2"]
    reseeded = [build_pairs(data, "random:2", seed=s).column("doc_id").to_pylist() for s in (1, 2, 3)]
    assert any(docs != pairs.column("doc_id").to_pylist() for docs in reseeded)
    everything = build_pairs(data, f"random:{len(SKILLS) + 5}", query_ids=["q1"]).column("doc_id").to_pylist()
    assert sorted(everything) == sorted(SKILLS)  # K past the corpus: every document once
    training = build_pairs(data, "random:1", training=True)
    for qid, (_, positive) in INSTRUCTIONS.items():
        docs = training.filter(pc.equal(training.column("query_id"), qid)).column("doc_id").to_pylist()
        assert positive in docs and len(docs) <= 2


def test_run_file_candidates(clean, tmp_path):
    data = read_beir(clean, "test")
    run = tmp_path / "run.trec"
    run.write_text("q1 Q0 wipe_table 1 9.0 bm25\nq1 Q0 pick_cup 2 3.0 bm25\nq2 Q0 pour_water 1 5.0 bm25\n")
    pairs = build_pairs(data, str(run), query_ids=["q1", "q2"])
    assert pairs.column("doc_id").to_pylist() == ["wipe_table", "pick_cup", "pour_water"]
    run.write_text("q1 Q0 nonexistent 1 9.0 bm25\n")
    with pytest.raises(DataError, match=r"run.trec:1: field 'docid': unknown document"):
        build_pairs(data, str(run))
    # A query the folder does not have at all (another dataset's run, ids written differently) is named, not
    # dropped; queries of the folder outside the pairs' queries are simply not used.
    run.write_text("q1 Q0 wipe_table 1 9.0 bm25\nquery-1 Q0 wipe_table 1 9.0 bm25\n")
    with pytest.raises(DataError, match=r"run.trec:2: field 'qid': unknown query 'query-1'"):
        build_pairs(data, str(run), query_ids=["q1"])
    run.write_text("q1 Q0 wipe_table 1 9.0 bm25\nq2 Q0 wipe_table 1 9.0 bm25\n")
    assert build_pairs(data, str(run), query_ids=["q1"]).column("query_id").to_pylist() == ["q1"]


def test_bad_candidate_specs_are_data_errors_naming_the_spec(clean):
    data = read_beir(clean, "test")
    with pytest.raises(DataError, match="candidates 'bm25:many': bm25:K needs an integer K"):
        build_pairs(data, "bm25:many")
    with pytest.raises(DataError, match="candidates 'dense:10': no run file"):
        build_pairs(data, "dense:10")
    with pytest.raises(DataError, match="student:K is not accepted"):
        build_pairs(data, "student:3")


def test_parquet_corpus_and_shard_folders_read_like_jsonl(clean, tmp_path):
    """One file discovery for every reader: a Parquet corpus and a folder of query shards read as the JSONL files
    do, and the in-process candidate policies (all, bm25:K) build the same pairs from them."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    other = tmp_path / "other"
    other.mkdir()
    (other / "qrels").mkdir()
    (other / "qrels" / "test.tsv").write_bytes((clean / "qrels" / "test.tsv").read_bytes())
    rows = [json.loads(line) for line in (clean / "corpus.jsonl").read_text().splitlines() if line.strip()]
    pq.write_table(pa.Table.from_pylist(rows), other / "corpus.parquet")
    lines = (clean / "queries.jsonl").read_text().splitlines(keepends=True)
    (other / "queries").mkdir()
    (other / "queries" / "part-0.jsonl").write_text("".join(lines[:2]))
    (other / "queries" / "part-1.jsonl").write_text("".join(lines[2:]))
    expected, got = read_beir(clean, "test"), read_beir(other, "test")
    assert got.corpus == expected.corpus and got.queries == expected.queries and got.qrels == expected.qrels
    for spec in ("all", "bm25:2"):
        assert build_pairs(got, spec, training=True).equals(build_pairs(expected, spec, training=True))


def test_bundled_demo_data_is_clean_and_split():
    from rabtriever_ray.data import DEMO_DATA

    train, dev = read_beir(DEMO_DATA, "train"), read_beir(DEMO_DATA, "dev")
    assert len(train.corpus) == 30 and len(train.queries) == 150 and len(dev.queries) == 60
    assert not set(train.queries) & set(dev.queries) and train.rejects == dev.rejects == []
    assert all(len(judged) == 1 for judged in {**train.qrels, **dev.qrels}.values())


def test_all_candidates_are_refused_beyond_the_pair_bound(tmp_path, monkeypatch):
    from rabtriever_ray.data import candidates

    corpus = {f"doc{i}": (f"Skill {i}", f"Step {i} of a household task.") for i in range(10)}
    queries = {f"q{i}": (f"please do task {i}", f"doc{i}") for i in range(4)}
    data = read_beir(write_beir(tmp_path / "generated", corpus, queries), "test")
    monkeypatch.setattr(candidates, "MAX_ALL_PAIRS", 40)
    assert len(build_pairs(data, "all")) == 40  # 4 queries x 10 documents: at the bound
    monkeypatch.setattr(candidates, "MAX_ALL_PAIRS", 39)
    with pytest.raises(
        DataError, match=r"'all': 4 queries x 10 documents = 40 pairs, more than 39; use bm25:K"
    ):
        build_pairs(data, "all", training=True)
    assert len(build_pairs(data, "all", max_queries=3)) == 30  # fewer queries fit
    assert len(build_pairs(data, "bm25:2")) == 8  # and so does bm25:K


def test_the_all_bound_is_in_the_help_of_the_options_that_default_to_all():
    from dataclasses import fields

    from rabtriever_ray.config import DistillConfig, TeacherTrainConfig
    from rabtriever_ray.data import MAX_ALL_PAIRS

    helps = {
        (config.__name__, f.name): f.metadata["help"]
        for config in (DistillConfig, TeacherTrainConfig)
        for f in fields(config)
        if f.name in ("val_candidates", "round_pool")
    }
    assert len(helps) == 3
    assert all(f"refused beyond {MAX_ALL_PAIRS:,} queries x" in text for text in helps.values())


def test_truncated_gzip_names_the_file(tmp_path):
    root = write_beir(tmp_path / "d", gz=True)
    path = root / "corpus.jsonl.gz"
    path.write_bytes(path.read_bytes()[:-12])  # the stream's end (CRC and size) cut off
    with pytest.raises(DataError, match=r"corpus.jsonl.gz: not a complete gzip file"):
        read_beir(root, "test")


@pytest.mark.parametrize("gz", [False, True])
def test_a_line_over_the_limit_is_a_bad_row_read_past(tmp_path, monkeypatch, gz):
    import rabtriever_ray.data.files as files

    monkeypatch.setattr(files, "MAX_LINE_BYTES", 200)
    long_doc = '{"_id": "long", "text": "' + "word " * 100 + '"}'
    root = write_beir(tmp_path / "d", gz=gz, extra_corpus_lines=[long_doc, '{"_id": "after", "text": "kept"}'])
    with pytest.raises(DataError, match=r"corpus.jsonl(.gz)?:7: field '<row>': line longer than 200 bytes"):
        read_beir(root, "test")
    data = read_beir(root, "test", on_bad_row="skip")
    assert "after" in data.corpus and "long" not in data.corpus
    assert [(r.line, r.field) for r in data.rejects] == [(7, "<row>")]


def test_run_lines_need_a_finite_rank_of_at_least_zero():
    from rabtriever_ray.data.rows import RowError, parse_run_line

    assert parse_run_line("q1 Q0 d1 3 1.5 bm25") == ("q1", "d1", 3.0)
    for rank in ("nan", "inf", "-1"):
        with pytest.raises(RowError, match="not a finite rank >= 0") as raised:
            parse_run_line(f"q1 Q0 d1 {rank} 1.5 bm25")
        assert raised.value.field == "rank"
