"""The distillation run: teacher stage -> Ray Train -> checkpoint, report and curves.

`run_distill(config)`:

1. reads the train and validation BEIR data and builds candidate pairs (training mode adds the positives); run-file
   candidates are read and joined in Ray instead (`data.stream`: the training pairs stream, the validation pairs
   and the documents they name are gathered, the corpus never is), except with the in-job teacher fine-tuning
   and ``all`` / ``bm25:K`` round pools, which read their data in the driver; with
   ``finetune_teacher`` and a base-model teacher, first fine-tunes it on the training split
   (`finetune.finetune_before_distillation`: scores the validation pairs before and after, writes
   ``out_dir/teacher/``), and distils from the fine-tuned model, reusing its validation scores;
2. scores the validation pairs once with the teacher stage (or reads them, ``val_teacher_data``), and hands the
   *lazy* teacher stage over the training pairs to Ray Train as ``datasets={"train": ...}``, so teacher actors and
   training workers run at the same time (or reads pre-scored pairs, ``teacher_data``);
3. runs `train.train_loop_per_worker` under ``TorchTrainer`` (DDP, or DeepSpeed with ``strategy=deepspeed``;
   ``RunConfig(name, storage_path)``, so a rerun with the same name resumes from the latest checkpoint;
   ``FailureConfig`` recovers failed workers);
4. with ``rounds > 1``, each later round lets the current student draw the pairs the teacher scores next
   (`rounds.sample_round_pairs`; `rounds.sample_round_stream` for a run-file or ``student:K`` pool, read and
   drawn in Ray) and trains on from the previous round's checkpoint, as its own Ray Train run
   (``<name>-round<r>``);
5. writes ``out_dir/report.json`` (config, per-round and per-epoch history, final validation metrics of student,
   teacher, BM25 and the zero-shot teacher, agreement, top-1 concentration, per-query cost, timings, counts),
   ``out_dir/checkpoint/`` and ``out_dir/training_curves.png``; `format_summary` is the screen the job ends with.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any

from . import console
from .config import DistillConfig, TeacherConfig, prompt_differences, to_dict
from .data import DEMO_DATA, build_pairs, read_beir
from .data.candidates import BM25Index, is_run_file, parse_candidates
from .data.stream import read_beir_dataset, run_pairs, run_subset
from .io import atomic_dir, init_ray, write_json_atomic
from .metrics import HEADLINE_MEASURES, metrics_table, retrieval_metrics, run_from_rows
from .models import model_hidden_size, prompt_mismatch, resolve_spec, trained_prompt
from .pipeline import SchemaError, document_major, pairs_dataset, read_teacher_scores, teacher_stage

logger = logging.getLogger(__name__)
LOG_FILE = "job.log"  # in out_dir: what Ray and this package log, unless the job runs with verbose=true


def _data_root(cfg: DistillConfig, sub: str) -> Path:
    root = Path(cfg.data_dir) if cfg.data_dir else DEMO_DATA
    return root / sub if sub else root


def _validation(
    cfg: DistillConfig, val_data, teacher: TeacherConfig, stage_args: dict, val_pairs=None
) -> tuple[dict, float, int]:
    """Validation pairs with teacher scores and qrels: read from ``val_teacher_data`` or scored once, up front
    (``val_pairs`` when given, else built from ``val_data``).

    Returns ``(val, seconds, pairs the teacher scored)``.
    """
    import pyarrow as pa
    import ray

    t0 = time.perf_counter()
    if cfg.val_teacher_data:
        dataset, _ = _read_scored(cfg, cfg.val_teacher_data)
        scored, n_scored = pa.concat_tables(ray.get(dataset.to_arrow_refs())), 0
        unknown = set(scored.column("query_id").to_pylist()) - set(val_data.qrels)
        if unknown:
            raise SchemaError(
                f"{cfg.val_teacher_data}: {len(unknown)} queries (e.g. {sorted(unknown)[0]!r}) have no qrels "
                f"in {cfg.val_data or 'the validation data'} split {cfg.val_split!r}"
            )
    else:
        if val_pairs is None:
            val_pairs = build_pairs(val_data, cfg.val_candidates, cfg.max_val_queries, cfg.seed)
        # Scored before training starts, alone: it may use the training workers' CPUs too (up to one node's),
        # and document-major order lets each teacher batch run a shared document prefix for many queries.
        val_cpus = max(
            cfg.teacher_cpus,
            min(cfg.teacher_cpus + cfg.cpus_per_worker * cfg.num_workers / cfg.teacher_actors, _node_cpus()),
        )
        stage = teacher_stage(
            pairs_dataset(document_major(val_pairs), cfg.teacher_batch_size),
            teacher,
            **{**stage_args, "cpus_per_actor": val_cpus},
        )
        with console.stage("teacher: validation pairs", len(val_pairs), "pairs") as bar:
            scored, n_scored = console.collect_rows(stage, bar), len(val_pairs)
    val = {
        name: scored.column(name).to_pylist()
        for name in ("query_id", "doc_id", "query_text", "doc_text", "teacher_score")
    }
    val["qrels"] = {qid: val_data.qrels[qid] for qid in set(val["query_id"])}
    return val, time.perf_counter() - t0, n_scored


def _same_model(a: str, b: str) -> bool:
    """Two model specs name the same model: equal, or the same directory written two ways."""
    return a == b or (Path(a).is_dir() and Path(b).is_dir() and Path(a).resolve() == Path(b).resolve())


def _read_scored(cfg: DistillConfig, path: str):
    """Pre-scored Parquet as a Dataset and its manifest, checked against this run's teacher before anything runs:
    hidden size, model spec and every prompt field."""
    dataset, manifest = read_teacher_scores(path, hidden_size=model_hidden_size(cfg.teacher.model))
    scored_by = manifest["teacher"]
    if not _same_model(scored_by["model"], cfg.teacher.model):
        raise SchemaError(
            f"{path}: scored by teacher {scored_by['model']!r}, but teacher={cfg.teacher.model!r}"
        )
    differ = prompt_differences(scored_by["prompt"], to_dict(cfg.teacher.prompt))
    if differ:
        key, scored, current = differ[0]
        raise SchemaError(
            f"{path}: scored with a different prompt (prompt.{key}={scored!r}, this run has {current!r}); "
            "rescore it or align the prompt config"
        )
    return dataset, manifest


def run_distill(cfg: DistillConfig, fail_once_after_step: tuple[str, int] | None = None) -> dict[str, Any]:
    """Run one distillation (see the module docstring); returns the report that is also written to disk."""
    from .raytrain import WholeBlockSplit, fit_torch_trainer, read_history
    from .rounds import sample_round_pairs, sample_round_stream, student_pool_size
    from .train import train_loop_per_worker

    started = time.perf_counter()
    student_pool = student_pool_size(cfg.round_pool) is not None
    if cfg.rounds > 1 and not student_pool:
        parse_candidates(cfg.round_pool)  # a bad pool fails now, not after round 0 has trained
    teacher = dataclasses.replace(cfg.teacher, model=resolve_spec(cfg.teacher.model))
    cfg = dataclasses.replace(cfg, teacher=teacher)  # workers run elsewhere
    out_dir = Path(cfg.out_dir or f"runs/{cfg.name}").resolve()
    storage = Path(cfg.storage_path).resolve() if cfg.storage_path else out_dir / "ray"
    will_finetune = (
        cfg.finetune_teacher
        and not (cfg.teacher_data or cfg.val_teacher_data)
        and not trained_prompt(cfg.teacher.model)
    )
    # Run-file candidates, and on-policy rounds that pool from a run file or the student's first stage, are read
    # and joined in Ray (`data.stream`): the driver holds the validation subset and counts, never the corpus. The
    # in-job teacher fine-tuning and the in-process pools (all, bm25:K) still read their data here.
    stream_val = is_run_file(cfg.val_candidates) and not cfg.val_teacher_data and not will_finetune
    stream_rounds = cfg.rounds > 1 and (student_pool or is_run_file(cfg.round_pool))
    stream_train = is_run_file(cfg.candidates) and not cfg.teacher_data and (cfg.rounds == 1 or stream_rounds)
    val_pairs = None
    if stream_val or stream_train or stream_rounds:
        init_ray()
    if stream_val:
        val_data, val_pairs = run_subset(
            _data_root(cfg, cfg.val_data), cfg.val_split, cfg.val_candidates, cfg.max_val_queries, cfg.seed
        )
    else:
        val_data = read_beir(_data_root(cfg, cfg.val_data), cfg.val_split)
    train_data = None
    if (not cfg.teacher_data and not stream_train) or (cfg.rounds > 1 and not stream_rounds):
        train_data = read_beir(_data_root(cfg, cfg.train_data), cfg.train_split)
    train_stream = None
    if stream_train or stream_rounds:
        train_stream = read_beir_dataset(_data_root(cfg, cfg.train_data), cfg.train_split)
    init_ray()
    tuned = None
    if will_finetune:
        from .finetune import finetune_before_distillation

        tuned = finetune_before_distillation(
            cfg, _data_root(cfg, cfg.train_data), _data_root(cfg, cfg.val_data), storage, _free_node_cpus()
        )
        # From here on the fine-tuned model is the teacher, and the scores it wrote are the validation's.
        tuned_dir = out_dir / "teacher"
        cfg = dataclasses.replace(
            cfg,
            teacher=dataclasses.replace(cfg.teacher, model=str(tuned_dir)),
            val_teacher_data=str(tuned_dir / "val_scores"),
        )
    teacher = cfg.teacher
    stage_args = {
        "actors": (1, cfg.teacher_actors),
        "cpus_per_actor": cfg.teacher_cpus,
        "batch_size": cfg.teacher_batch_size,
        "gpus_per_actor": cfg.teacher_gpus if cfg.use_gpu else 0.0,
    }
    if cfg.teacher_data:
        round0_stage, manifest = _read_scored(cfg, cfg.teacher_data)
        n_train, n_train_queries = manifest["rows"], manifest["queries"]
    elif stream_train:
        # Grouped by query: each block holds whole candidate lists, a few blocks per worker.
        train_blocks, counts = run_pairs(
            train_stream,
            cfg.candidates,
            training=True,
            max_queries=cfg.max_train_queries,
            seed=cfg.seed,
            min_partitions=4 * cfg.num_workers,
        )
        n_train, n_train_queries = counts["pairs"], counts["queries"]
    else:
        train_pairs = build_pairs(train_data, cfg.candidates, cfg.max_train_queries, cfg.seed, training=True)
        n_train, n_train_queries = len(train_pairs), len(set(train_pairs.column("query_id").to_pylist()))
    _steps_per_epoch(n_train, cfg)  # fail before the validation scoring, not after
    warning = prompt_mismatch(cfg.teacher.model, to_dict(cfg.teacher.prompt))
    if warning:
        logger.warning(warning)
    _warn_if_no_cpu_left_for_data(cfg)
    val, val_teacher_s, val_scored = _validation(cfg, val_data, teacher, stage_args, val_pairs)
    if stream_train:
        round0_stage = teacher_stage(train_blocks, teacher, **{**stage_args, "batch_size": None})
    elif not cfg.teacher_data:
        round0_stage = _training_stage(cfg, train_pairs, teacher, stage_args)

    checkpoint, first_epoch, rounds, train_s, steps_done = None, 0, [], 0.0, 0
    for round_index in range(cfg.rounds):
        t0 = time.perf_counter()
        if round_index == 0:
            stage = round0_stage
        elif stream_rounds:
            # As below, with pools joined in Ray and drawn block by block: whole lists per block.
            # One CPU stays free for Ray Data's own tasks (column projections, joins) that feed the actors.
            drawn, counts = sample_round_stream(
                cfg,
                train_stream,
                checkpoint,
                round_index,
                max(_node_cpus() - 1.0, 0.5),
                min_partitions=4 * cfg.num_workers,
            )
            n_train, n_train_queries = counts["pairs"], counts["queries"]
            stage = teacher_stage(drawn, teacher, **{**stage_args, "batch_size": None})
        else:
            # The current student draws the pairs; the teacher scores exactly those, streaming into training.
            pairs = sample_round_pairs(cfg, train_data, checkpoint, round_index, cpus=_node_cpus())
            n_train = len(pairs)
            n_train_queries = len(set(pairs.column("query_id").to_pylist()))
            stage = _training_stage(cfg, pairs, teacher, stage_args)
        sample_s = time.perf_counter() - t0
        epochs = cfg.epochs if round_index == 0 else (cfg.round_epochs or cfg.epochs)
        steps_per_epoch = _steps_per_epoch(n_train, cfg)
        title = "distilling Rabtriever" + (
            f" (round {round_index + 1} of {cfg.rounds})" if cfg.rounds > 1 else ""
        )
        # Workers report the step counted over every round so far.
        with console.stage(title, steps_done + epochs * steps_per_epoch, "steps") as bar:
            bar.update(steps_done)
            checkpoint = fit_torch_trainer(
                train_loop_per_worker,
                {
                    "distill": cfg,
                    "steps_per_epoch": steps_per_epoch,
                    "val": val,
                    "fail_once_after_step": fail_once_after_step,
                    "round": round_index,
                    "first_epoch": first_epoch,
                    "end_epoch": first_epoch + epochs,
                    "init_checkpoint": checkpoint,
                },
                cfg,
                # Each round is its own Ray Train run, so a rerun resumes the round it stopped in.
                cfg.name if round_index == 0 else f"{cfg.name}-round{round_index}",
                storage,
                bar=bar,
                datasets={"train": stage},
                dataset_config=WholeBlockSplit(datasets_to_split=["train"]),
            )
        round_s = time.perf_counter() - t0
        train_s += round_s
        with checkpoint.as_directory() as directory:
            history = read_history(directory)
        this_round = [h for h in history if h.get("round", 0) == round_index]
        before = [h for h in history if h.get("round", 0) == round_index - 1]
        rounds.append(
            {
                "round": round_index,
                "train_queries": n_train_queries,
                "train_pairs": n_train,
                "pairs_scored_by_teacher": _scored_by_teacher(cfg, round_index, this_round),
                "epochs": epochs,
                "steps_per_epoch": steps_per_epoch,
                "val_before": _val_metrics(before[-1]) if before else None,
                "val_after": _val_metrics(this_round[-1]) if this_round else None,
                "sample_s": round(sample_s, 1),
                "elapsed_s": round(round_s, 1),
            }
        )
        first_epoch += epochs
        steps_done = int(this_round[-1]["step"]) if this_round else steps_done

    with (
        checkpoint.as_directory() as directory,
        atomic_dir(out_dir / "checkpoint", overwrite=True) as staging,
    ):
        shutil.copytree(directory, staging, dirs_exist_ok=True)
    history = read_history(out_dir / "checkpoint")

    final = _final_metrics(history[-1], val, val_data)
    if tuned is not None:
        final["teacher_zero_shot"] = tuned["before"]
    top1, cost = _top1_and_cost(cfg, val, val_data, out_dir / "checkpoint")
    report = {
        "config": to_dict(cfg),
        "final": final,
        "top1": top1,
        "cost": cost,
        "rounds": rounds,
        "history": history,
        "counts": {
            "train_queries": rounds[0]["train_queries"],
            "train_pairs": rounds[0]["train_pairs"],
            "train_pairs_scored_by_teacher": sum(r["pairs_scored_by_teacher"] for r in rounds),
            "val_queries": len(val["qrels"]),
            "val_pairs": len(val["query_id"]),
            "val_pairs_scored_by_teacher": val_scored,
            "steps_per_epoch": rounds[0]["steps_per_epoch"],
        },
        "teacher_finetune": None
        if tuned is None
        else {
            "model": cfg.teacher.model,
            "before": tuned["before"],
            "after": tuned["after"],
            "counts": tuned["counts"],
            "timings_s": tuned["timings_s"],
        },
        "timings_s": {
            "finetune_teacher": tuned["timings_s"]["total"] if tuned else 0.0,
            "val_teacher": round(val_teacher_s, 1),
            "train_with_streaming_teacher": round(train_s, 1),
            "total": round(time.perf_counter() - started, 1),
        },
    }
    write_json_atomic(out_dir / "report.json", report)
    plot_curves(history, out_dir / "training_curves.png")
    return report


def _training_stage(cfg: DistillConfig, pairs, teacher, stage_args: dict):
    """The teacher stage over training pairs, in blocks of whole candidate lists that it keeps whole (one actor
    call per block), a few blocks per worker so that the workers' whole-block shards come out close in size."""
    per_block = max(1, min(cfg.teacher_batch_size, len(pairs) // (4 * cfg.num_workers)))
    blocks = pairs_dataset(pairs, rows_per_block=per_block, whole_queries=True)
    return teacher_stage(blocks, teacher, **{**stage_args, "batch_size": None})


def _steps_per_epoch(n_train: int, cfg: DistillConfig) -> int:
    steps = n_train // (cfg.batch_size * cfg.num_workers)
    if steps < 1:
        raise ValueError(
            f"{n_train} training pairs are fewer than batch_size x num_workers = "
            f"{cfg.batch_size * cfg.num_workers}; lower batch_size or add queries"
        )
    return steps


def _warn_if_no_cpu_left_for_data(cfg: DistillConfig) -> None:
    """Ray Data runs its stage (teacher actors or Parquet reads) on the CPUs the training workers leave free."""
    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    workers = cfg.cpus_per_worker * cfg.num_workers
    needed = workers + (0.25 if cfg.teacher_data else cfg.teacher_cpus)
    if total < needed:
        logger.warning(
            "the cluster has %.2f CPUs now; %d workers x cpus_per_worker=%.2f leave too few for the data stage "
            "(it needs %.2f). Training waits until an autoscaler adds CPUs; on a fixed cluster lower "
            "cpus_per_worker or teacher_cpus.",
            total,
            cfg.num_workers,
            cfg.cpus_per_worker,
            needed - workers,
        )


def _node_cpus() -> float:
    """CPUs of the largest alive node (what one sampler actor may use while nothing else runs)."""
    import ray

    return max(n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"])


def _free_node_cpus() -> float:
    """CPUs one task may take now: the largest node's, less what others hold (a Serve app building its demo)."""
    import ray

    return min(_node_cpus(), ray.available_resources().get("CPU", 0.0))


def _scored_by_teacher(cfg: DistillConfig, round_index: int, this_round: list[dict]) -> int:
    """Teacher rows the workers read in the round's first epoch (0 when the scores came from ``teacher_data``).

    Measured by the workers (``teacher_rows``), not set from the pair count: what the workers actually read.
    """
    if round_index == 0 and cfg.teacher_data:
        return 0
    return int(this_round[0].get("teacher_rows", 0)) if this_round else 0


def _val_metrics(entry: dict) -> dict:
    return {k.removeprefix("val/"): v for k, v in entry.items() if k.startswith("val/")}


def _final_metrics(last: dict, val: dict, val_data) -> dict[str, Any]:
    """Student (from the last validation), teacher and BM25 on the validation candidates.

    BM25 ranks each query's candidates by its scores from a top-k search, k the longest candidate list (not the
    corpus): exact when the candidates are BM25's own top K or the whole corpus; a candidate below BM25's top k
    scores 0, below every candidate that BM25 ranks. With run-file validation candidates ``val_data`` holds only the
    candidates' documents, so BM25's statistics (IDF, lengths) are theirs, not the corpus's.
    """
    teacher_run = run_from_rows(val["query_id"], val["doc_id"], val["teacher_score"])
    bm25 = BM25Index.from_corpus(val_data)
    queries = sorted(set(val["query_id"]))
    depth = max(Counter(val["query_id"]).values(), default=1)
    hits, scores = bm25.search([val_data.queries[q].text for q in queries], min(depth, len(val_data.corpus)))
    bm25_full = {q: dict(zip(h, map(float, s))) for q, h, s in zip(queries, hits, scores)}
    bm25_run = run_from_rows(
        val["query_id"],
        val["doc_id"],
        [bm25_full[q].get(d, 0.0) for q, d in zip(val["query_id"], val["doc_id"])],
    )
    student = {m: last[f"val/{m}"] for m in HEADLINE_MEASURES}
    return {
        "student": student,
        "teacher": retrieval_metrics(teacher_run, val["qrels"], HEADLINE_MEASURES),
        "bm25": retrieval_metrics(bm25_run, val["qrels"], HEADLINE_MEASURES),
        "agreement": {"spearman": last["val/spearman"], "top1": last["val/top1_agreement"]},
    }


def _top1_and_cost(cfg: DistillConfig, val: dict, val_data, checkpoint: Path) -> tuple[dict, dict | None]:
    """The bias diagnosis and the cost, measured in this process on the validation candidates.

    ``top1``: for the teacher and the student, the document ranked first for the most validation queries
    (`metrics.top1_concentration`). ``cost``: milliseconds per query for the teacher and for Rabtriever to rank the
    candidates of the same ``cost_queries`` seeded validation queries (`evaluate.Evaluation`, which times per-query
    work only: Rabtriever's documents are encoded beforehand, as an index holds them), and their ratio; None when
    ``cost_queries`` is 0.
    """
    import random

    from .evaluate import Evaluation
    from .metrics import top1_concentration

    candidates: dict[str, list[str]] = {}
    for qid, did in zip(val["query_id"], val["doc_id"]):
        candidates.setdefault(qid, []).append(did)
    queries = sorted(candidates)
    with console.stage("Rabtriever: validation queries", len(queries), "queries") as bar:
        student_run = Evaluation(val_data, queries, candidates, cfg.teacher, checkpoint).run("rabtriever")
        bar.update(len(queries))
    teacher_run = run_from_rows(val["query_id"], val["doc_id"], val["teacher_score"])
    top1 = {"teacher": top1_concentration(teacher_run), "student": top1_concentration(student_run)}
    if not cfg.cost_queries:
        return top1, None
    sample = sorted(random.Random(cfg.seed).sample(queries, min(cfg.cost_queries, len(queries))))
    timed = Evaluation(val_data, sample, candidates, cfg.teacher, checkpoint)
    with console.stage("timing teacher and Rabtriever per query", 2, "judges") as bar:
        for method in ("rabtriever", "teacher"):
            timed.run(method)
            bar.update(1)
    teacher_ms, student_ms = (timed.timing[m]["per_query_ms"] for m in ("teacher", "rabtriever"))
    cost = {
        "queries": len(sample),
        "candidates_per_query": round(sum(len(candidates[q]) for q in sample) / len(sample), 1),
        "teacher_ms": teacher_ms,
        "student_ms": student_ms,
        "speedup": round(teacher_ms / student_ms, 1) if student_ms > 0 else None,
    }
    return top1, cost


def plot_curves(history: list[dict], path: Path) -> None:
    """Losses and validation metrics per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for key in sorted(k for k in history[0] if k.startswith("loss/")):
        left.plot(steps, [h[key] for h in history], marker="o", label=key.removeprefix("loss/"))
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.set_yscale("log")
    left.legend()
    for key in sorted(k for k in history[0] if k.startswith("val/")):
        right.plot(steps, [h[key] for h in history], marker="o", label=key.removeprefix("val/"))
    right.set_xlabel("step")
    right.set_ylabel("validation")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_table(final: dict[str, Any]) -> str:
    """The final validation table as markdown: teacher, Rabtriever, BM25 and, when the job fine-tuned the teacher,
    the zero-shot teacher; then the student-teacher agreement."""
    tuned = "teacher_zero_shot" in final
    names = {
        "teacher": "teacher (fine-tuned)" if tuned else "teacher",
        "student": "Rabtriever",
        "bm25": "BM25",
        "teacher_zero_shot": "teacher (zero-shot)",
    }
    rows = {label: final[key] for key, label in names.items() if key in final}
    lines = [metrics_table(rows, measures=HEADLINE_MEASURES)]
    agree = final["agreement"]
    lines.append(
        f"\nRabtriever agrees with the teacher: Spearman {agree['spearman']:.3f}, "
        f"the same top-1 document for {agree['top1']:.0%} of queries"
    )
    return "\n".join(lines)


def format_summary(report: dict[str, Any], out_dir: str | Path) -> str:
    """The one screen the job ends with: the table, agreement, top-1 concentration, per-query cost, time and
    where everything was written."""
    counts = report["counts"]
    lines = [
        f"Validation: {counts['val_queries']} queries, {counts['val_pairs']} candidate pairs",
        "",
        format_table(report["final"]),
    ]
    top1 = report.get("top1")
    if top1:
        parts = [
            f"{label} puts {t['doc_id']} first for {t['queries']} of {t['of']} queries"
            for label, t in (("the teacher", top1["teacher"]), ("Rabtriever", top1["student"]))
        ]
        lines.append("Most frequent top-1 document: " + "; ".join(parts))
    cost = report.get("cost")
    if cost:
        lines.append(
            f"Per query ({cost['candidates_per_query']:g} candidates, {cost['queries']} queries timed here): "
            f"teacher {cost['teacher_ms']:,.0f} ms, Rabtriever {cost['student_ms']:,.1f} ms "
            f"({cost['speedup']:g}x cheaper)"
        )
    timings = report["timings_s"]
    spent = f"Time: {_minutes(timings['total'])}"
    if timings.get("finetune_teacher"):
        spent += f" (fine-tuning and validating the teacher {_minutes(timings['finetune_teacher'])})"
    lines.append(spent)
    out = Path(out_dir)
    written = ["report.json", "checkpoint/", "training_curves.png"]
    if report.get("teacher_finetune"):
        written.insert(2, "teacher/")
    if (out / LOG_FILE).is_file():
        written.append(f"{LOG_FILE} (Ray's log lines)")
    lines.append(f"Wrote {out}/: " + ", ".join(written))
    return "\n".join(lines)


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"
