"""The Ray Data teacher stage and jobs/score_teacher.py on local Ray with the tiny model."""

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import INSTRUCTIONS, SKILLS, write_beir

from rabtriever_ray.config import PromptConfig, ScoreTeacherConfig, TeacherConfig
from rabtriever_ray.data import build_pairs, read_beir
from rabtriever_ray.io import OutputExistsError
from rabtriever_ray.pipeline import (
    SchemaError,
    check_schema,
    output_schema,
    pairs_dataset,
    teacher_stage,
)
from rabtriever_ray.prompts import PromptBuilder
from rabtriever_ray.teacher import GenerativeReranker
from rabtriever_ray.teacher_scores import read_teacher_scores, write_teacher_scores

TEACHER = TeacherConfig(
    model="tiny-random-llama", prompt=PromptConfig(max_doc_tokens=24, max_query_tokens=16)
)
N_PAIRS = len(SKILLS) * len(INSTRUCTIONS)


@pytest.fixture
def beir(tmp_path):
    return write_beir(tmp_path / "skills")


def _stage_kwargs(**extra):
    return {"cpus_per_actor": 0.5, "batch_size": 8, **extra}


def _score_config(data, out, **options) -> ScoreTeacherConfig:
    """jobs/score_teacher.py's config for the "test" split of ``data`` with the tiny teacher."""
    return ScoreTeacherConfig(data=str(data), split="test", out=str(out), teacher=TEACHER, **options)


def test_stage_scores_equal_in_process_teacher(ray_local, beir):
    pairs = build_pairs(read_beir(beir, "test"), "all")
    rows = teacher_stage(pairs_dataset(pairs, rows_per_block=10), TEACHER, **_stage_kwargs()).to_arrow_refs()
    table = pa.concat_tables(ray_local.get(rows))
    assert table.num_rows == N_PAIRS
    assert check_schema(table.schema, hidden_size=64) == 64 and table.schema.equals(output_schema(64))
    table = table.sort_by([("query_id", "ascending"), ("doc_id", "ascending")])
    model, tokenizer = __import__("rabtriever_ray.models", fromlist=["x"]).load_causal_lm(
        "tiny-random-llama", "cpu"
    )
    reference = GenerativeReranker(model, tokenizer, TEACHER.prompt).score(
        table.column("query_text").to_pylist(), table.column("doc_text").to_pylist()
    )
    np.testing.assert_allclose(table.column("teacher_score").to_numpy(), reference.score.numpy(), atol=1e-4)
    np.testing.assert_allclose(table.column("logp_yes").to_numpy(), reference.logp_yes.numpy(), atol=1e-4)
    hidden = np.stack(table.column("teacher_hidden").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(hidden, reference.hidden.numpy(), atol=1e-4)
    assert table.column("doc_tokens").to_pylist() == reference.doc_tokens.tolist()
    assert table.column("truncated").to_pylist() == reference.truncated.tolist()


def test_killed_actor_is_replaced_and_every_pair_written_once(ray_local, beir, tmp_path):
    marker = tmp_path / "crashed"
    out = tmp_path / "scores"
    config = _score_config(beir, out, actors="1:1", **_stage_kwargs(batch_size=5))
    manifest = write_teacher_scores(config, crash_once=(str(marker), 1))
    assert marker.exists()  # an actor really died mid-stage (after its first batch)
    table = pq.ParquetDataset(str(out / "data")).read()
    pairs = list(zip(table.column("query_id").to_pylist(), table.column("doc_id").to_pylist()))
    assert len(pairs) == len(set(pairs)) == N_PAIRS == manifest["rows"]


def test_a_batch_that_kills_its_actor_every_time_fails_naming_its_first_pair(ray_local, beir):
    """Ray would restart the actor and retry the batch without end; after a few deaths the stage fails instead,
    naming the batch's first query and document, and the other batch's actor is not held up."""
    pairs = build_pairs(read_beir(beir, "test"), "all", max_queries=2, seed=0)
    poison = pairs.column("query_id")[0].as_py()
    stage = teacher_stage(
        pairs_dataset(pairs, len(SKILLS), whole_queries=True), TEACHER, batch_size=None, cpus_per_actor=0.5,
        crash_on_query=poison,
    )  # fmt: skip
    with pytest.raises(Exception, match="killed its teacher actor 3 times") as raised:
        stage.materialize()
    assert f"(query {poison!r}, document " in str(raised.value)


def test_job_writes_parquet_and_manifest_and_refuses_rerun(ray_local, beir, tmp_path, capsys):
    from score_teacher import main

    out = tmp_path / "out"
    args = [
        "--data",
        str(beir),
        "--split",
        "test",
        "--out",
        str(out),
        "--model",
        "tiny-random-llama",
        "--cpus-per-actor",
        "0.5",
        "--batch-size",
        "8",
        "--max-queries",
        "3",
        "teacher.prompt.max_doc_tokens=24",
    ]
    manifest = main(args)
    assert (
        manifest["rows"] == 3 * len(SKILLS)
        and manifest["queries"] == 3
        and manifest["documents"] == len(SKILLS)
    )
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["teacher"]["model"] == "tiny-random-llama" and on_disk["hidden_size"] == 64
    assert on_disk["teacher"]["prompt"]["max_doc_tokens"] == 24 and "{document}" in on_disk["prompt_template"]
    assert on_disk["prompt_template"] == PromptBuilder.template_text(PromptConfig(max_doc_tokens=24))
    assert on_disk["candidates"] == "all" and on_disk["elapsed_s"] > 0
    sanity = on_disk["sanity"]  # the teacher sanity report, computed from the written files and printed
    assert sanity["queries"] == 3 and sanity["pairs"] == manifest["rows"] and "warnings" in sanity
    assert f"Teacher sanity: 3 queries, {manifest['rows']} pairs" in capsys.readouterr().out
    assert not (out / "rejects.jsonl").exists()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no staging left behind
    dataset, read_manifest = read_teacher_scores(out, hidden_size=64)
    assert dataset.count() == manifest["rows"] and read_manifest["rows"] == manifest["rows"]
    with pytest.raises(SchemaError, match="hidden size is 576"):
        read_teacher_scores(out, hidden_size=576)

    before = (out / "manifest.json").read_text()
    with pytest.raises(OutputExistsError, match="already holds a finished run; pass --overwrite"):
        main(args)
    assert (out / "manifest.json").read_text() == before  # untouched
    manifest = main(args[:-1] + ["--max-queries", "2", "--overwrite"])
    assert manifest["rows"] == 2 * len(SKILLS)
    assert pq.ParquetDataset(str(out / "data")).read().num_rows == 2 * len(SKILLS)


def test_job_skip_policy_writes_rejects(ray_local, tmp_path):
    root = write_beir(
        tmp_path / "broken", extra_corpus_lines=['{"_id": "x", "text": '], extra_qrel_lines=["q1\tnope\t1"]
    )
    out = tmp_path / "out"
    manifest = write_teacher_scores(_score_config(root, out, on_bad_row="skip", **_stage_kwargs()))
    assert manifest["rows"] == N_PAIRS and manifest["rejected_rows"] == {"corpus.jsonl": 1, "test.tsv": 1}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rejects] == [(7, "<json>"), (7, "corpus-id")]


def test_job_with_a_run_file_reads_and_joins_in_ray_data(ray_local, tmp_path):
    """Run-file candidates go through the Ray Data readers and joins: the same pairs as the in-process path, bad
    rows in rejects.jsonl, and in training mode every written file holding whole candidate lists."""
    root = write_beir(
        tmp_path / "broken", extra_corpus_lines=['{"_id": "x", "text": '], extra_qrel_lines=["q1\tnope\t1"]
    )
    run = tmp_path / "run.trec"
    run.write_text(
        "".join(f"{q} Q0 {d} {r} 1.0 t\n" for q in INSTRUCTIONS for r, d in enumerate(SKILLS) if r < 3)
    )
    out = tmp_path / "out"
    config = _score_config(
        root, out, candidates=str(run), training=True, on_bad_row="skip", actors="1:2", **_stage_kwargs()
    )
    manifest = write_teacher_scores(config)
    expected = build_pairs(read_beir(root, "test", on_bad_row="skip"), str(run), training=True)
    assert manifest["rows"] == len(expected) and manifest["queries"] == len(INSTRUCTIONS)
    assert manifest["rejected_rows"] == {"corpus.jsonl": 1, "test.tsv": 1}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["field"]) for r in rejects] == [(7, "<json>"), (7, "corpus-id")]
    files = sorted((out / "data").glob("*.parquet"))
    assert len(files) > 1
    seen = set()
    for path in files:
        queries = set(pq.read_table(path, columns=["query_id"]).column("query_id").to_pylist())
        assert not queries & seen  # a query's list lies in one file
        seen |= queries
    written = pq.ParquetDataset(str(out / "data")).read()
    key = lambda t: sorted(zip(*(t.column(c).to_pylist() for c in ("query_id", "doc_id", "label"))))  # noqa: E731
    assert key(written) == key(expected)


def test_failed_run_leaves_nothing_that_looks_complete(ray_local, tmp_path):
    root = write_beir(tmp_path / "broken", extra_corpus_lines=['{"_id": "x", "text": '])
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"corpus.jsonl:7"):
        write_teacher_scores(_score_config(root, out, **_stage_kwargs()))
    assert not out.exists() and list(tmp_path.iterdir()) == [root]


def test_check_schema_rejects_wrong_columns():
    schema = output_schema(8)
    assert check_schema(schema) == 8
    with pytest.raises(SchemaError, match="column 'label' is int64, expected int8"):
        check_schema(schema.set(schema.get_field_index("label"), pa.field("label", pa.int64())))
    with pytest.raises(SchemaError, match="missing column 'logp_no'"):
        check_schema(schema.remove(schema.get_field_index("logp_no")))
    with pytest.raises(SchemaError, match="teacher_hidden"):
        check_schema(pa.schema([("query_id", pa.string())]))


def test_job_cli_reports_bad_input_without_traceback(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "jobs/score_teacher.py",
            "--data",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
            "--model",
            "tiny-random-llama",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        result.returncode == 2
        and "data folder not found" in result.stderr
        and "Traceback" not in result.stderr
    )


def test_an_in_process_folder_as_ray_datasets_reads_as_the_ray_reader_does(ray_local, beir):
    """`as_datasets` (a `BeirData` for the Ray stages) holds the rows `read_beir_dataset` reads from the same
    folder."""
    from rabtriever_ray.data import as_datasets, read_beir_dataset

    data = read_beir(beir, "test")
    converted, read = as_datasets(data, rows_per_block=2), read_beir_dataset(beir, "test", cpus=0.25)
    for name in ("corpus", "queries", "qrels"):
        assert sorted(map(tuple, (r.values() for r in getattr(converted, name).take_all()))) == sorted(
            map(tuple, (r.values() for r in getattr(read, name).take_all()))
        )
    assert converted.counts == read.counts
    corpus = converted.corpus.take_all()
    assert [row["doc_id"] for row in corpus] == list(SKILLS) and corpus[0]["doc_text"].startswith(
        "Pick up the cup\n"
    )
    assert converted.corpus.num_blocks() > 1
    subset = as_datasets(data, ["q2", "q1"]).queries.take_all()
    assert [row["query_id"] for row in subset] == ["q2", "q1"]
    assert subset[0]["query_text"] == INSTRUCTIONS["q2"][0]


def test_training_blocks_hold_whole_candidate_lists_and_the_split_hands_out_whole_blocks(ray_local):
    """`pairs_dataset(whole_queries=True)` cuts at query boundaries (after shuffling the pairs' order), the teacher
    stage maps whole blocks, and `WholeBlockSplit` gives each of two workers whole blocks: every query's pairs reach
    one worker, in one block."""
    import random
    import threading

    from rabtriever_ray.data import PAIR_SCHEMA
    from rabtriever_ray.raytrain import WholeBlockSplit

    sizes = [3, 8, 1, 5, 8, 2, 8, 4, 6, 7]
    rows = [(f"q{i:02d}", f"d{j}") for i, size in enumerate(sizes) for j in range(size)]
    random.Random(0).shuffle(rows)
    pairs = pa.table(
        {
            "query_id": [q for q, _ in rows],
            "doc_id": [d for _, d in rows],
            "label": pa.array([0] * len(rows), pa.int8()),
            "query_text": [q for q, _ in rows],
            "doc_text": [d for _, d in rows],
        },
        schema=PAIR_SCHEMA,
    )
    dataset = pairs_dataset(pairs, rows_per_block=10, whole_queries=True)
    blocks = [ray_local.get(ref) for ref in dataset.to_arrow_refs()]
    assert sum(b.num_rows for b in blocks) == len(rows) and len(blocks) >= 4
    for block in blocks:
        ids = block.column("query_id").to_pylist()
        assert all(ids.count(q) == sizes[int(q[1:])] for q in set(ids))  # whole lists only
        assert block.num_rows < 10 + max(sizes)  # cut at the first boundary past rows_per_block
        doc_order = {
            q: [d for i, d in zip(ids, block.column("doc_id").to_pylist()) if i == q] for q in set(ids)
        }
        assert all(docs == [d for i, d in rows if i == q] for q, docs in doc_order.items())  # order kept

    scored = teacher_stage(dataset, TEACHER, **_stage_kwargs(batch_size=None))  # one actor call per block
    shards = WholeBlockSplit(datasets_to_split=["train"]).configure({"train": scored}, 2, None, None)
    seen: list[list[list[str]]] = [[], []]

    def read(rank: int) -> None:
        for block in shards[rank]["train"].iter_batches(batch_size=None, batch_format="pyarrow"):
            seen[rank].append(block.column("query_id").to_pylist())

    threads = [threading.Thread(target=read, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    per_worker = [[q for block in worker for q in block] for worker in seen]
    assert sorted(per_worker[0] + per_worker[1]) == sorted(q for q, _ in rows)  # every row, once
    assert not set(per_worker[0]) & set(per_worker[1])  # no list split across workers
    for worker in seen:
        for block in worker:
            assert all(block.count(q) == sizes[int(q[1:])] for q in set(block))


def test_a_non_finite_teacher_score_stops_the_stage_naming_the_pair():
    """A broken teacher (a NaN weight) fails its batch with the first pair's ids, not a silent NaN column."""
    import torch

    from rabtriever_ray.models import build_tiny_random_llama
    from rabtriever_ray.pipeline import NonFiniteScore, TeacherScorer

    model, tokenizer = build_tiny_random_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    scorer = TeacherScorer.__new__(TeacherScorer)  # the actor's state, with this model instead of a spec
    scorer.teacher, scorer.batches = GenerativeReranker(model, tokenizer), 0
    scorer.attempts_dir = scorer.crash_once = scorer.crash_on_query = scorer.outputs_dir = None
    pairs = pa.table(
        {
            "query_id": ["q7", "q7"],
            "doc_id": ["d1", "d2"],
            "label": pa.array([1, 0], pa.int8()),
            "query_text": ["wipe the table", "wipe the table"],
            "doc_text": ["pick up the cup", "open the drawer"],
        }
    )
    with pytest.raises(NonFiniteScore, match=r"2 of 2 pairs .* \(query 'q7', document 'd1'\)"):
        scorer(pairs)


def test_teacher_actors_on_one_node_take_the_cores_the_training_workers_leave_idle(ray_local):
    """On local Ray (one node) a distillation's teacher actors share the node's threads (its training workers wait
    for them); a value given is used as is; the actor sets torch's threads when it starts."""
    import torch

    from rabtriever_ray.pipeline import TeacherScorer
    from rabtriever_ray.runtime import node_cpus, teacher_threads

    assert int(node_cpus()) == 2  # the session's local Ray
    assert teacher_threads(0, 1.0, 1) == 2 and teacher_threads(0, 0.5, 2) == 1 and teacher_threads(3, 1.0, 1) == 3

    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            TeacherScorer(TeacherConfig(model="tiny-random-llama"), threads=threads)
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
