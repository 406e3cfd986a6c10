"""The distillation run on local Ray with the tiny model and a slice of the bundled demo data."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_DISTILL, TINY_TEACHER, distill_config, load_script

from rabtriever_ray.distill import run_distill


@pytest.mark.slow  # a full Ray Train distillation (and its resume)
def test_two_workers_train_report_and_resume_after_a_failure(ray_local, tmp_path):
    marker = tmp_path / "failed"
    config = distill_config(tmp_path, "name=two_workers", "epochs=3", "max_failures=1")
    report = run_distill(config, fail_once_after_step=(str(marker), 3))
    assert marker.exists()  # a worker really failed at step 3 and the run recovered from its checkpoint
    history = report["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]  # no epoch lost or repeated after the failure
    assert history[-1]["step"] == 3 * report["counts"]["steps_per_epoch"]
    assert history[-1]["loss/total"] < history[0]["loss/total"]
    for key in ("loss/jepa", "loss/rkl", "loss/list", "lr", "pairs_per_s", "val/R@1", "val/spearman"):
        assert key in history[-1]
    assert len(history[-1]["worker_peak_rss_mb"]) == 2  # one per worker, named as the teacher loop names it
    # The workers count the teacher rows they read: each gets whole blocks, and together every row; the restart
    # after the failure in epoch 1 reads the stream again; epoch 2 replays.
    (round0,) = report["rounds"]
    delivered = round0["train_pairs"]
    assert round0["pairs_scored_by_teacher"] == delivered == report["counts"]["train_pairs_scored_by_teacher"]
    assert [h["teacher_rows"] for h in history] == [delivered, delivered, 0]
    # The teacher scored each pair once: the restart read back what was scored before the failure.
    assert round0["teacher_pairs_scored"] == delivered and round0["teacher_pairs_read_back"] == delivered
    assert not (tmp_path / "run" / "ray" / "two_workers-teacher-outputs").exists()  # removed once trained
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
    resumed = run_distill(distill_config(tmp_path, "name=two_workers", "epochs=4"))
    assert [h["epoch"] for h in resumed["history"]] == [0, 1, 2, 3]
    assert resumed["history"][3]["step"] == 4 * report["counts"]["steps_per_epoch"]
    assert resumed["history"][3]["teacher_rows"] == delivered  # a new start reads the stream again
    assert resumed["rounds"][0]["pairs_scored_by_teacher"] == delivered
    assert resumed["rounds"][0]["teacher_pairs_scored"] == delivered


def test_too_few_pairs_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="fewer than batch_size x num_workers"):
        run_distill(distill_config(tmp_path, "batch_size=4096"))


def test_a_bad_round_pool_fails_at_load_naming_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"round_pool 'bm25:x': bm25:K needs an integer K"):
        distill_config(tmp_path, "rounds=2", "round_pool=bm25:x")
    with pytest.raises(ValueError, match=r"round_pool '.*missing.trec': no run file at .*missing.trec"):
        distill_config(tmp_path, "rounds=2", f"round_pool={tmp_path / 'missing.trec'}")


@pytest.mark.slow  # a full Ray Train distillation
def test_training_on_pre_scored_parquet(ray_local, tmp_path):
    from rabtriever_ray.config import ScoreTeacherConfig
    from rabtriever_ray.data import DEMO_DATA
    from rabtriever_ray.pipeline import SchemaError
    from rabtriever_ray.teacher_scores import write_teacher_scores

    scores = tmp_path / "scores"
    manifest_config = ScoreTeacherConfig(
        data=str(DEMO_DATA),
        split="train",
        out=str(scores),
        teacher=TINY_TEACHER,
        candidates="bm25:4",
        max_queries=16,
        training=True,
        cpus_per_actor=0.5,
        batch_size=32,
    )
    manifest = write_teacher_scores(manifest_config)
    val_scores = tmp_path / "val_scores"
    val_manifest = write_teacher_scores(
        dataclasses.replace(
            manifest_config,
            split="dev",
            out=str(val_scores),
            candidates="bm25:6",
            max_queries=8,
            training=False,
        )
    )
    config = distill_config(
        tmp_path,
        "name=pre_scored",
        "epochs=2",
        "num_workers=1",
        f"teacher_data={scores}",
        f"val_teacher_data={val_scores}",
    )
    report = run_distill(config)
    counts = report["counts"]
    assert counts["train_pairs"] == manifest["rows"] and counts["train_pairs_scored_by_teacher"] == 0
    assert [h["teacher_rows"] for h in report["history"]] == [manifest["rows"], 0]  # every stored row read
    assert counts["val_pairs"] == val_manifest["rows"] and counts["val_pairs_scored_by_teacher"] == 0
    assert [h["epoch"] for h in report["history"]] == [0, 1]

    # Scores from another prompt are refused before training, naming the differing key.
    other_prompt = distill_config(
        tmp_path, "name=other", "num_workers=1", f"teacher_data={scores}", "teacher.prompt.doc_label=Skill"
    )
    with pytest.raises(SchemaError, match="prompt.doc_label='Document'"):
        run_distill(other_prompt)

    wrong = distill_config(
        tmp_path, "name=wrong", "num_workers=1", f"teacher_data={scores}", "teacher=smollm2-135m"
    )
    with pytest.raises(SchemaError, match="hidden size is 576"):
        run_distill(wrong)


def _write_run(pairs, path):
    """A TREC run with the pairs' candidates in their order."""
    ranks: dict[str, int] = {}
    with open(path, "w") as handle:
        for qid, did in zip(pairs.column("query_id").to_pylist(), pairs.column("doc_id").to_pylist()):
            ranks[qid] = ranks.get(qid, 0) + 1
            handle.write(f"{qid} Q0 {did} {ranks[qid]} {1.0 / ranks[qid]:.4f} bm25\n")
    return path


@pytest.mark.slow  # a full Ray Train distillation in two rounds
def test_run_file_candidates_and_on_policy_rounds(ray_local, tmp_path, monkeypatch):
    """Run files as candidates and validation candidates, and a round pooled from the student's first stage: pairs
    read, joined and drawn in Ray, the driver holding only the validation subset (the in-process reader is never
    called). Round 1 scores the pairs the student drew; a rerun of another run with the same name is refused."""
    import rabtriever_ray.data.beir
    import rabtriever_ray.distill as distill
    from rabtriever_ray.data import DEMO_DATA, build_pairs, read_beir

    train_run = _write_run(build_pairs(read_beir(DEMO_DATA, "train"), "bm25:4"), tmp_path / "train.trec")
    val_run = _write_run(build_pairs(read_beir(DEMO_DATA, "dev"), "bm25:6"), tmp_path / "dev.trec")

    def refuse(*args, **kwargs):
        raise AssertionError("read_beir called: the driver read a whole BEIR folder")

    monkeypatch.setattr(distill, "read_beir", refuse)
    monkeypatch.setattr(rabtriever_ray.data.beir, "read_beir", refuse)
    config = distill_config(
        tmp_path,
        "name=runs",
        "epochs=2",
        "num_workers=1",
        f"candidates={train_run}",
        f"val_candidates={val_run}",
        "rounds=2",
        "round_epochs=1",
        "round_pool=student:4",
        "round_k=2",
        "teacher_cache_mb=0",  # every stored teacher batch spills to disk and is read back in epoch 1
    )
    report = run_distill(config)
    counts = report["counts"]
    assert counts["train_queries"] == 20 and counts["val_queries"] == 8 and counts["val_pairs"] == 8 * 6
    first, second = report["rounds"]
    # Each training query: its 4 run candidates, plus its positive when BM25 missed it.
    assert 20 * 4 <= first["train_pairs"] <= 20 * 5
    assert report["history"][0]["spilled_batches"] >= first["steps_per_epoch"]
    # One worker: the stream is not split, so the worker reads every pair the teacher scored.
    assert first["pairs_scored_by_teacher"] == first["train_pairs"] and first["val_before"] is None
    # Round 1: 2 of the student's top 4 per query, plus the positive when it was not drawn.
    assert second["train_queries"] == 20 and 2 * 20 <= second["train_pairs"] <= 3 * 20
    assert second["pairs_scored_by_teacher"] == second["train_pairs"]
    assert counts["train_pairs_scored_by_teacher"] == first["train_pairs"] + second["train_pairs"]
    assert set(report["final"]) == {"student", "teacher", "bm25", "agreement"}
    history = report["history"]
    assert [(h["round"], h["epoch"]) for h in history] == [(0, 0), (0, 1), (1, 2)]
    assert second["val_before"]["R@1"] == history[1]["val/R@1"]
    assert second["val_after"]["spearman"] == history[2]["val/spearman"]
    assert history[2]["step"] == history[1]["step"] + second["steps_per_epoch"]  # round 1 trained on its pairs

    # A rerun with the same name but another run (here other losses and a changed training run file) is refused
    # before anything is scored, naming what differs (resume=any is checked in test_raytrain.py; a rerun of a
    # finished job, which trains nothing again, in test_the_job_fine_tunes_a_base_teacher_first_...).
    train_run.write_text(train_run.read_text() + "\n")
    other = dataclasses.replace(config, loss=dataclasses.replace(config.loss, w_rkl=config.loss.w_rkl + 1))
    with pytest.raises(ValueError, match=r"another run with this name; what differs: files:candidates, loss.w_rkl"):
        run_distill(other)


@pytest.mark.slow  # a full Ray Train distillation
def test_deepspeed_two_workers_resume_after_a_failure(ray_local, tmp_path):
    pytest.importorskip("deepspeed")
    marker = tmp_path / "failed"
    config = distill_config(
        tmp_path, "name=deepspeed", "epochs=3", "strategy=deepspeed", "zero_stage=2", "max_failures=1"
    )
    from rabtriever_ray.data import DEMO_DATA, build_pairs, read_beir

    pairs = build_pairs(read_beir(DEMO_DATA, "train"), "bm25:4", 20, 0, training=True)
    steps_per_epoch = len(pairs) // (16 * 2)  # batch_size x workers
    report = run_distill(config, fail_once_after_step=(str(marker), steps_per_epoch))
    assert report["counts"]["steps_per_epoch"] == steps_per_epoch
    assert report["rounds"][0]["pairs_scored_by_teacher"] == len(
        pairs
    )  # whole blocks: every row reaches a worker
    assert marker.exists()  # rank 0 failed in epoch 1; both ranks reloaded their ZeRO partitions
    history = report["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[-1]["loss/total"] < history[0]["loss/total"]
    checkpoint = tmp_path / "run" / "checkpoint"
    # Ray Train merged every rank's files into one checkpoint: each rank's optimizer partition is there.
    assert {p.name for p in checkpoint.glob("optimizer_rank*.pt")} == {
        "optimizer_rank0.pt",
        "optimizer_rank1.pt",
    }


@pytest.mark.slow  # jobs/distill.py run twice as a subprocess
def test_the_job_fine_tunes_a_base_teacher_first_and_ends_with_one_screen(tmp_path):
    """`python jobs/distill.py` as a user runs it (its own local Ray): the base teacher is fine-tuned on the
    training split, the screen holds the table, the diagnosis, the cost and the outputs but none of Ray's log
    lines (those are in job.log), and a rerun reuses the fine-tuned teacher and the finished distillation."""
    out = tmp_path / "run"
    dropped = ("finetune_teacher=false", "cost_queries=0", "num_workers=2", "baselines=")
    args = [a for a in TINY_DISTILL if a not in dropped]
    command = [
        sys.executable,
        str(Path(__file__).resolve().parents[1] / "jobs" / "distill.py"),
        *args,
        f"out_dir={out}",
        "epochs=2",
        "cost_queries=2",
        "finetune.max_queries=8",
        "finetune.batch_size=2",
        "finetune.train_layers=1",
        "finetune.cpus_per_worker=0.5",
        "finetune.teacher_cpus=0.5",
        "unlabelled_queries=rest",  # 6 of the training split's other queries, their labels unused
        "max_unlabelled_queries=6",
    ]
    env = {
        k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"
    }  # its own local Ray, as a user starts it
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    screen = done.stdout + done.stderr
    rows = ("teacher (fine-tuned)", "Rabtriever", "MiniLM (fine-tuned)", "MiniLM (zero-shot)", "BM25")
    for line in (*rows, "teacher (zero-shot)"):
        assert f"| {line} |" in screen
    assert "Training: 20 labelled queries and 6 unlabelled ones the teacher scored; MiniLM fine-tuned on" in screen
    assert "Most frequent top-1 document:" in screen and "x cheaper" in screen and f"Wrote {out}/" in screen
    ray_lines = (
        "INFO streaming_executor",
        "(RayTrainWorker",
        "(TrainController",
        "logging_progress",
        "real_accel",
    )
    for ray_line in (*ray_lines, "core_worker.cc"):  # the last: Ray's C++ core worker, on file descriptor 2
        assert ray_line not in screen
    assert "streaming_executor" in (out / "job.log").read_text()

    report = json.loads((out / "report.json").read_text())
    tuned = report["teacher_finetune"]
    assert tuned["model"] == str(out / "teacher") and (out / "teacher" / "rabtriever_teacher.json").is_file()
    final = report["final"]
    assert final["teacher_zero_shot"] == tuned["before"] and final["teacher"] == tuned["after"]
    counts = report["counts"]
    assert (counts["train_queries"], counts["labelled_train_queries"], counts["unlabelled_train_queries"]) == (
        26,
        20,
        6,
    )
    assert tuned["counts"]["train_queries"] == 8  # the teacher is fine-tuned on labelled queries only
    # MiniLM is fine-tuned on the 20 labelled queries and ranks the same validation candidates.
    minilm = report["baselines"]["minilm-ft"]
    assert (minilm["queries"], minilm["steps"]) == (20, 6) and minilm["train_s"] > 0  # 2 batches x 3 epochs
    assert set(final["minilm"]) == set(final["minilm_ft"]) == {"R@1", "RR@10", "nDCG@10"}
    assert report["config"]["teacher"]["model"] == str(
        out / "teacher"
    )  # the student's backbone is the tuned one
    cost = report["cost"]
    assert cost["queries"] == 2 and cost["teacher_ms"] > 0 and cost["student_ms"] > 0
    assert cost["speedup"] == pytest.approx(cost["teacher_ms"] / cost["student_ms"], abs=0.06)  # to 0.1
    assert (
        report["top1"]["teacher"]["of"] == report["counts"]["val_queries"] == report["top1"]["student"]["of"]
    )

    # benchmarks/quality.py tabulates the report: what each method learnt from, and the student's fidelity.
    quality = load_script("benchmarks/quality.py")
    quality.main(["--report", str(out / "report.json"), "--out", str(tmp_path / "quality.json")])
    table = json.loads((tmp_path / "quality.json").read_text())
    learnt = {row["method"]: (row["labelled_queries"], row["unlabelled_queries"]) for row in table["rows"]}
    assert learnt == {
        "BM25": (0, 0),
        "MiniLM (zero-shot)": (0, 0),
        "MiniLM (fine-tuned)": (20, 0),
        "teacher (zero-shot)": (0, 0),
        "teacher (fine-tuned)": (8, 0),
        "Rabtriever": (20, 6),
    }
    rabtriever = table["rows"][-1]
    assert rabtriever["R@1"] == final["student"]["R@1"] and rabtriever["train_min"] > 0
    assert table["fidelity"]["spearman"] == round(final["agreement"]["spearman"], 3)

    stamp = (out / "teacher" / "report.json").stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (out / "teacher" / "report.json").stat().st_mtime_ns == stamp  # reused, not trained again
    rerun = json.loads((out / "report.json").read_text())
    assert [h["epoch"] for h in rerun["history"]] == [0, 1] and rerun["final"]["teacher"] == final["teacher"]


def test_the_bm25_row_ranks_the_candidates_as_a_search_of_the_whole_corpus_does():
    """BM25 searches only as deep as the longest candidate list; on BM25's own top-K candidates, and on the whole
    corpus, that ranks every candidate as a search of the whole corpus does."""
    from rabtriever_ray.data import DEMO_DATA, BM25Index, build_pairs, read_beir
    from rabtriever_ray.metrics import HEADLINE_MEASURES, retrieval_metrics, run_from_rows
    from rabtriever_ray.report import final_metrics

    data = read_beir(DEMO_DATA, "dev")
    for candidates in ("bm25:5", "all"):
        pairs = build_pairs(data, candidates).to_pydict()
        val = {**pairs, "teacher_score": [0.0] * len(pairs["doc_id"]), "qrels": data.qrels}
        last = {f"val/{m}": 0.0 for m in (*HEADLINE_MEASURES, "spearman", "top1_agreement")}
        queries = sorted(set(pairs["query_id"]))
        hits, scores = BM25Index.from_corpus(data).search([data.queries[q].text for q in queries], 10_000)
        whole = {q: dict(zip(h, map(float, s))) for q, h, s in zip(queries, hits, scores)}
        bm25_scores = [whole[q][d] for q, d in zip(pairs["query_id"], pairs["doc_id"])]
        reference = run_from_rows(pairs["query_id"], pairs["doc_id"], bm25_scores)
        expected = retrieval_metrics(reference, data.qrels, HEADLINE_MEASURES)
        assert final_metrics(last, val, data)["bm25"] == expected
