"""A distillation's training queries (`data.training_queries`): the labelled sample, and unlabelled queries beside
it from the rest of the split or from a queries file, never a validation query; their pairs' labels are unknown."""

import json
import shutil

import pytest
from helpers import distill_config

from rabtriever_ray.config import ConfigError, DistillConfig, load_config
from rabtriever_ray.data import (
    DEMO_DATA,
    DataError,
    build_pairs,
    read_beir,
    sample_query_ids,
    training_queries,
)
from rabtriever_ray.data.training import unlabelled_source
from rabtriever_ray.distill import plan_distill


def test_labelled_sample_then_the_rest_of_the_split_without_labels():
    train, dev = read_beir(DEMO_DATA, "train"), read_beir(DEMO_DATA, "dev")
    data, counts = training_queries(train, 20, 3, "rest", 7, exclude=dev)

    labelled = sample_query_ids(list(train.queries), 20, 3)
    assert counts == {"labelled": 20, "unlabelled": 7}
    assert list(data.queries)[:20] == labelled  # the labelled sample first, as build_pairs samples it
    unlabelled = list(data.queries)[20:]
    assert not set(unlabelled) & set(labelled) and set(unlabelled) <= set(train.queries)
    assert set(data.qrels) == set(labelled)  # their labels are unused
    # The same seed draws the same unlabelled queries.
    assert training_queries(train, 20, 3, "rest", 7, exclude=dev)[0].queries == data.queries

    pairs = build_pairs(data, "bm25:4", training=True, query_ids=list(data.queries))
    label = dict(
        zip(
            zip(pairs.column("query_id").to_pylist(), pairs.column("doc_id").to_pylist()),
            pairs.column("label").to_pylist(),
        )
    )
    for qid in labelled:  # each labelled list holds its positive, labelled 1, and judged negatives, 0
        grades = [g for (q, _), g in label.items() if q == qid]
        assert sorted(set(grades)) == [0, 1]
    assert {g for (q, _), g in label.items() if q in unlabelled} == {-1}
    assert {q for q, _ in label} == set(data.queries)


def test_a_queries_file_in_the_training_folder_minus_validation_queries(tmp_path):
    train, dev = read_beir(DEMO_DATA, "train"), read_beir(DEMO_DATA, "dev")
    dev_id, dev_query = next(iter(dev.queries.items()))
    lines = [
        {"_id": "u1", "text": "The dog keeps staring at its empty bowl."},
        {"_id": "u2", "text": f"  {dev_query.text} "},  # a validation query's text under another id
        {"_id": dev_id, "text": "A validation query's id."},
        {"_id": "u3", "text": "My inhaler is upstairs and I can't breathe well."},
    ]
    folder = tmp_path / "train"
    folder.mkdir()
    (folder / "more.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    train.root = folder  # a relative file name is looked up in the training folder first

    data, counts = training_queries(train, 5, 0, "more.jsonl", None, exclude=dev)
    assert counts == {"labelled": 5, "unlabelled": 2} and list(data.queries)[5:] == ["u1", "u3"]
    assert training_queries(train, 5, 0, str(folder / "more.jsonl"), 1, exclude=dev)[1]["unlabelled"] == 1

    (folder / "bad.jsonl").write_text('{"_id": "u1", "text": "fine"}\n{"_id": "u2"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'text'"):
        training_queries(train, 5, 0, "bad.jsonl")
    with pytest.raises(DataError, match="no queries file 'missing.jsonl'"):
        training_queries(train, 5, 0, "missing.jsonl")
    (folder / "dev.jsonl").write_text(f'{{"_id": "{dev_id}", "text": "x"}}\n')
    with pytest.raises(DataError, match="no query left"):
        training_queries(train, 5, 0, "dev.jsonl", exclude=dev)


def test_unlabelled_queries_need_candidates_the_job_builds(tmp_path):
    run = tmp_path / "train.trec"
    run.write_text("q001 Q0 wipe_surface 1 1.0 x\n")
    for extra in ([f"candidates={run}"], ["teacher_data=somewhere"], ["rounds=2", "round_pool=student:4"]):
        with pytest.raises(ConfigError, match="unlabelled_queries are scored by the live teacher"):
            distill_config(tmp_path, "unlabelled_queries=rest", *extra)
    with pytest.raises(ConfigError, match=r"baselines: unknown \['e5'\]"):
        distill_config(tmp_path, "baselines=minilm,e5")


def test_auto_takes_the_training_folders_unlabelled_queries_where_the_job_builds_candidates(tmp_path):
    # The embedded defaults train on the demo's unlabelled instructions; a folder without the file trains on none.
    default = load_config(DistillConfig, None, [])
    assert default.unlabelled_queries == "auto"
    assert unlabelled_source(default, plan_distill(default).train_root) == "unlabelled_queries.jsonl"
    bare = tmp_path / "data"
    shutil.copytree(DEMO_DATA, bare)
    (bare / "unlabelled_queries.jsonl").unlink()
    assert unlabelled_source(*_planned(f"data_dir={bare}")) == ""
    # Where the job does not build the candidates (pre-scored pairs, a run file), auto is none, not an error.
    run = tmp_path / "train.trec"
    run.write_text("q001 Q0 wipe_surface 1 1.0 x\n")
    for extra in ("teacher_data=somewhere", f"candidates={run}"):
        assert unlabelled_source(*_planned(extra)) == ""
    assert unlabelled_source(*_planned("unlabelled_queries=rest")) == "rest"  # anything else is kept
    assert unlabelled_source(*_planned("unlabelled_queries=")) == ""


def _planned(*overrides):
    config = load_config(DistillConfig, None, list(overrides))
    return config, plan_distill(config).train_root


def test_the_demo_ships_unlabelled_instructions_apart_from_its_judged_queries():
    train, dev = read_beir(DEMO_DATA, "train"), read_beir(DEMO_DATA, "dev")
    data, counts = training_queries(train, None, 0, "unlabelled_queries.jsonl", None, exclude=dev)
    assert counts == {"labelled": 150, "unlabelled": 600}  # none is a validation query
    judged = {q.text.strip().lower() for q in (*train.queries.values(), *dev.queries.values())}
    unlabelled = [q.text.strip().lower() for q in list(data.queries.values())[150:]]
    assert len(set(unlabelled)) == 600 and not judged & set(unlabelled)
    assert not any(skill.replace("_", " ") in text for skill in train.corpus for text in unlabelled)
