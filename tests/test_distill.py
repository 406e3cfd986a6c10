"""The distillation run on local Ray with the tiny model and a slice of the bundled demo data."""

import json

import pytest

from rabtriever_ray.config import DistillConfig, load_config
from rabtriever_ray.distill import run_distill

TINY = [
    "teacher=tiny-random-llama",
    "max_train_queries=20",
    "max_val_queries=8",
    "candidates=bm25:4",
    "val_candidates=bm25:6",
    "batch_size=16",
    "num_workers=2",
    "cpus_per_worker=0.5",
    "teacher_cpus=0.5",
    "teacher_batch_size=16",
    "student.predictor_hidden=32",
    "warmup_steps=2",
    "prompt.max_query_tokens=32",
    "prompt.max_doc_tokens=48",
]


def _config(tmp_path, *extra):
    return load_config(DistillConfig, None, TINY + [f"out_dir={tmp_path / 'run'}", *extra])


def test_two_workers_train_report_and_resume_after_a_failure(ray_local, tmp_path):
    marker = tmp_path / "failed"
    config = _config(tmp_path, "name=two_workers", "epochs=3", "max_failures=1")
    report = run_distill(config, fail_once_after_step=(str(marker), 3))
    assert marker.exists()  # a worker really failed at step 3 and the run recovered from its checkpoint
    history = report["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]  # no epoch lost or repeated after the failure
    assert history[-1]["step"] == 3 * report["counts"]["steps_per_epoch"]
    assert history[-1]["loss/total"] < history[0]["loss/total"]
    for key in ("loss/jepa", "loss/rkl", "loss/list", "lr", "pairs_per_s", "val/R@1", "val/spearman"):
        assert key in history[-1]
    final = report["final"]
    assert set(final) == {"student", "teacher", "bm25", "agreement"}
    assert set(final["student"]) == {"R@1", "RR@10", "nDCG@10"} and set(final["agreement"]) == {
        "spearman",
        "top1",
    }
    out = tmp_path / "run"
    assert json.loads((out / "report.json").read_text())["final"] == final
    assert (out / "checkpoint" / "student.safetensors").is_file() and (
        out / "training_curves.png"
    ).stat().st_size > 0
    assert not list((out / "checkpoint").glob("*.bin"))  # never the frozen backbone

    # A second run with the same name resumes from the checkpoint instead of starting over.
    resumed = run_distill(_config(tmp_path, "name=two_workers", "epochs=4"))
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3]
    assert resumed["history"][3]["step"] == 4 * report["counts"]["steps_per_epoch"]


def test_too_few_pairs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than batch_size x num_workers"):
        run_distill(_config(tmp_path, "batch_size=4096"))


def test_training_on_pre_scored_parquet(ray_local, tmp_path):
    from rabtriever_ray.config import PromptConfig, TeacherConfig
    from rabtriever_ray.data import DEMO_DATA
    from rabtriever_ray.pipeline import SchemaError, write_teacher_scores

    scores = tmp_path / "scores"
    teacher = TeacherConfig(
        model="tiny-random-llama", prompt=PromptConfig(max_query_tokens=32, max_doc_tokens=48)
    )
    manifest = write_teacher_scores(
        DEMO_DATA,
        "train",
        scores,
        teacher,
        candidates="bm25:4",
        max_queries=16,
        training=True,
        cpus_per_actor=0.5,
        batch_size=32,
    )
    config = _config(tmp_path, "name=pre_scored", "epochs=2", "num_workers=1", f"teacher_data={scores}")
    report = run_distill(config)
    assert (
        report["counts"]["train_pairs"] == manifest["rows"]
        and report["counts"]["train_pairs_scored_by_teacher"] == 0
    )
    assert [h["epoch"] for h in report["history"]] == [0, 1]

    wrong = _config(tmp_path, "name=wrong", "num_workers=1", f"teacher_data={scores}", "teacher=smollm2-135m")
    with pytest.raises(SchemaError, match="hidden size is 576"):
        run_distill(wrong)
