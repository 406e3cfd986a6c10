"""The distillation recipe: plan -> pairs -> teacher -> train -> rounds -> report.

`run_distill(config)` reads top to bottom:

1. `plan_distill` decides once, from the config, what runs where (`DistillPlan`): whether the base-model teacher
   is fine-tuned first, whether the training pairs, the validation pairs and the later rounds' pools are read and
   joined in Ray (run files, ``student:K`` pools: the driver holds counts, never the corpus) or built in this
   process (``all``, ``bm25:K``, ``random:K``), or read pre-scored (``teacher_data``, ``val_teacher_data``); and
   where ``unlabelled_queries=auto`` finds its queries (`data.training.unlabelled_source`);
2. the validation pairs (`data.read_pairs`) and, with the in-job fine-tuning, the fine-tuned teacher
   (`finetune.finetune_before_distillation`: scores the same validation pairs before and after, writes
   ``out_dir/teacher/``), which is the teacher from then on;
3. round 0's teacher stage (`round_zero`): the *lazy* teacher stage over the training pairs, handed to Ray Train as
   ``datasets={"train": ...}`` so that teacher actors and training workers run at the same time; and the
   validation pairs scored once, up front (`pipeline.score_pairs`), their sanity report printed (`sanity`);
4. `train_rounds`: `distill_loop.train_loop_per_worker` under ``TorchTrainer`` (DDP, or DeepSpeed with
   ``strategy=deepspeed``; a rerun with the same name resumes from the latest checkpoint), then, with
   ``rounds > 1``, each later round lets the current student draw the pairs the teacher scores next
   (`rounds.sample_round_pairs` / `rounds.sample_round_stream`), trained on from the previous round's checkpoint as
   its own Ray Train run (``<name>-round<r>``);
5. the report (`report`): ``out_dir/report.json`` (config, per-round and per-epoch history, final validation
   metrics of student, teacher, MiniLM zero-shot and fine-tuned, BM25 and the zero-shot teacher, agreement, top-1
   concentration, per-query cost, the teacher's sanity figures, timings, counts), ``out_dir/checkpoint/`` and
   ``out_dir/training_curves.png``.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from . import console
from .config import DistillConfig, to_dict
from .data import build_pairs, data_root, read_beir, read_beir_dataset, read_pairs, run_pairs
from .data.training import training_queries, unlabelled_source
from .io import atomic_dir, write_json_atomic
from .models import prompt_mismatch, resolve_spec, trained_prompt
from .pipeline import SchemaError, pairs_dataset, score_pairs, teacher_stage
from .report import bi_encoders, final_metrics, plot_curves, top1_and_cost, val_metrics
from .runs import check_resume, distill_fingerprint, persisted_counts, teacher_outputs_dir
from .runtime import free_node_cpus, init_ray, node_cpus, teacher_threads, warn_if_no_cpu_left_for_data
from .sanity import format_sanity, teacher_sanity
from .teacher_scores import read_scores_for

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DistillPlan:
    """What a distillation does, decided once from its config before anything runs."""

    out_dir: Path
    storage: Path  # Ray Train's run folders
    train_root: Path
    val_root: Path
    finetune_teacher: bool  # fine-tune the base-model teacher on the training split first
    stream_train: bool  # training pairs from a run file, read and joined in Ray
    stream_rounds: bool  # later rounds pool in Ray (a run file or student:K)
    read_train_here: bool  # the training split read into this process (in-process pairs or pools)


def plan_distill(cfg: DistillConfig) -> DistillPlan:
    out_dir = Path(cfg.out_dir or f"runs/{cfg.name}").resolve()
    stream_train = cfg.candidates_spec.is_run and not cfg.teacher_data
    stream_rounds = cfg.rounds > 1 and cfg.round_pool_spec.kind in ("run", "student")
    return DistillPlan(
        out_dir=out_dir,
        storage=Path(cfg.storage_path).resolve() if cfg.storage_path else out_dir / "ray",
        train_root=data_root(cfg.data_dir, cfg.train_data),
        val_root=data_root(cfg.data_dir, cfg.val_data),
        finetune_teacher=cfg.finetune_teacher
        and not (cfg.teacher_data or cfg.val_teacher_data)
        and not trained_prompt(cfg.teacher.model),
        stream_train=stream_train,
        stream_rounds=stream_rounds,
        read_train_here=(not cfg.teacher_data and not stream_train) or (cfg.rounds > 1 and not stream_rounds),
    )


def run_distill(cfg: DistillConfig, fail_once_after_step: tuple[str, int] | None = None) -> dict[str, Any]:
    """Run one distillation (see the module docstring); returns the report that is also written to disk."""
    started = time.perf_counter()
    cfg = dataclasses.replace(
        cfg, teacher=dataclasses.replace(cfg.teacher, model=resolve_spec(cfg.teacher.model))
    )
    plan = plan_distill(cfg)
    cfg = dataclasses.replace(cfg, unlabelled_queries=unlabelled_source(cfg, plan.train_root))
    if cfg.val_teacher_data:
        val_data, val_pairs = read_beir(plan.val_root, cfg.val_split), None
    else:
        val_data, val_pairs = read_pairs(
            plan.val_root, cfg.val_split, cfg.val_candidates, cfg.max_val_queries, cfg.seed
        )
    train_data, query_counts = None, {"labelled": 0, "unlabelled": 0}
    if plan.read_train_here:  # cut to the queries it trains on: the labelled sample, then any unlabelled ones
        train_data, query_counts = training_queries(
            read_beir(plan.train_root, cfg.train_split),
            cfg.max_train_queries,
            cfg.seed,
            cfg.unlabelled_queries,
            cfg.max_unlabelled_queries,
            exclude=val_data,
        )
    init_ray()
    train_stream = None
    if plan.stream_train or plan.stream_rounds:
        train_stream = read_beir_dataset(plan.train_root, cfg.train_split)
    tuned = None
    if plan.finetune_teacher:
        from .finetune import finetune_before_distillation

        tuned = finetune_before_distillation(
            cfg, plan.train_root, val_data, val_pairs, plan.storage, free_node_cpus()
        )
        # From here on the fine-tuned model is the teacher, and the scores it wrote are the validation's.
        tuned_dir = plan.out_dir / "teacher"
        cfg = dataclasses.replace(
            cfg,
            teacher=dataclasses.replace(cfg.teacher, model=str(tuned_dir)),
            val_teacher_data=str(tuned_dir / "val_scores"),
        )
    fingerprint = distill_fingerprint(cfg, plan.train_root)
    for round_index in range(cfg.rounds):  # a rerun of another run stops here, before anything is scored
        check_resume(plan.storage / _run_name(cfg, round_index), fingerprint, cfg.resume)
    stage, n_train, n_train_queries = round_zero(cfg, plan, train_data, train_stream)
    warning = prompt_mismatch(cfg.teacher.model, to_dict(cfg.teacher.prompt))
    if warning:
        logger.warning(warning)
    warn_if_no_cpu_left_for_data(cfg)
    val, val_teacher_s, val_scored = validation(cfg, val_data, val_pairs)
    sanity = teacher_sanity(pa.table({k: val[k] for k in ("query_id", "doc_id", "teacher_score")}))
    print("\n" + format_sanity(sanity), flush=True)  # a broken teacher shows now, not after training
    checkpoint, rounds = train_rounds(
        cfg, plan, stage, (n_train, n_train_queries), val, train_data, train_stream, fingerprint, fail_once_after_step
    )
    outputs = teacher_outputs_dir(cfg, plan.storage)
    if outputs is not None:  # trained: the outputs were kept for a restart, and the checkpoints hold the result
        shutil.rmtree(outputs.parent, ignore_errors=True)

    with (
        checkpoint.as_directory() as directory,
        atomic_dir(plan.out_dir / "checkpoint", overwrite=True) as staging,
    ):
        shutil.copytree(directory, staging, dirs_exist_ok=True)
    from .raytrain import read_history

    history = read_history(plan.out_dir / "checkpoint")
    final = final_metrics(history[-1], val, val_data)
    if tuned is not None:
        final["teacher_zero_shot"] = tuned["before"]
    top1, cost = top1_and_cost(cfg, val, val_data, plan.out_dir / "checkpoint")
    bi_encoder_rows, bi_encoder_details = bi_encoders(cfg, val, train_data, query_counts["labelled"])
    final.update(bi_encoder_rows)
    report = {
        "config": to_dict(cfg),
        "final": final,
        "top1": top1,
        "cost": cost,
        "teacher_sanity": sanity,
        "baselines": bi_encoder_details,
        "rounds": rounds,
        "history": history,
        "counts": {
            "train_queries": rounds[0]["train_queries"],
            "labelled_train_queries": query_counts["labelled"] if train_data is not None else None,
            "unlabelled_train_queries": query_counts["unlabelled"],
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
            **{key: tuned[key] for key in ("before", "after", "counts", "timings_s")},
        },
        "timings_s": {
            "finetune_teacher": tuned["timings_s"]["total"] if tuned else 0.0,
            "val_teacher": round(val_teacher_s, 1),
            "train_with_streaming_teacher": round(sum(r["elapsed_s"] for r in rounds), 1),
            "total": round(time.perf_counter() - started, 1),
        },
    }
    write_json_atomic(plan.out_dir / "report.json", report)
    plot_curves(history, plan.out_dir / "training_curves.png")
    return report


def _run_name(cfg: DistillConfig, round_index: int) -> str:
    """Each round is its own Ray Train run, so a rerun resumes the round it stopped in."""
    return cfg.name if round_index == 0 else f"{cfg.name}-round{round_index}"


def _stage_args(cfg: DistillConfig, plan: DistillPlan) -> dict[str, Any]:
    """The teacher stage's actors for training pairs: one call per block (whole candidate lists)."""
    return {
        "actors": (1, cfg.teacher_actors),
        "cpus_per_actor": cfg.teacher_cpus,
        "batch_size": None,
        "gpus_per_actor": cfg.teacher_gpus if cfg.use_gpu else 0.0,
        "outputs_dir": teacher_outputs_dir(cfg, plan.storage),
        "threads": teacher_threads(cfg.teacher_threads, cfg.teacher_cpus, cfg.teacher_actors),
    }


def round_zero(cfg: DistillConfig, plan: DistillPlan, train_data, train_stream) -> tuple[Any, int, int]:
    """Round 0's teacher stage (lazy) over the training pairs, or the pre-scored pairs; with the pair and query
    counts. Fails here, before anything is scored, when the pairs make no training step."""
    if cfg.teacher_data:
        stage, manifest = read_scores_for(cfg.teacher, cfg.teacher_data)
        n_train, n_queries = manifest["rows"], manifest["queries"]
    elif plan.stream_train:
        # Grouped by query: each block holds whole candidate lists, a few blocks per worker.
        blocks, counts = run_pairs(
            train_stream,
            cfg.candidates,
            training=True,
            max_queries=cfg.max_train_queries,
            seed=cfg.seed,
            min_partitions=4 * cfg.num_workers,
        )
        stage, n_train, n_queries = (
            teacher_stage(blocks, cfg.teacher, **_stage_args(cfg, plan)),
            counts["pairs"],
            counts["queries"],
        )
    else:
        # train_data holds exactly the training queries (`data.training_queries`): no sampling here.
        pairs = build_pairs(
            train_data, cfg.candidates, seed=cfg.seed, training=True, query_ids=list(train_data.queries)
        )
        stage, n_train, n_queries = _training_stage(cfg, plan, pairs), len(pairs), len(train_data.queries)
    _steps_per_epoch(n_train, cfg)
    return stage, n_train, n_queries


def _training_stage(cfg: DistillConfig, plan: DistillPlan, pairs):
    """The teacher stage over in-process training pairs, in blocks of whole candidate lists that it keeps whole
    (one actor call per block), a few blocks per worker so that the workers' whole-block shards come out close in
    size."""
    per_block = max(1, min(cfg.teacher_batch_size, len(pairs) // (4 * cfg.num_workers)))
    return teacher_stage(pairs_dataset(pairs, per_block, whole_queries=True), cfg.teacher, **_stage_args(cfg, plan))


def validation(cfg: DistillConfig, val_data, val_pairs) -> tuple[dict, float, int]:
    """Validation pairs with teacher scores and qrels: read from ``val_teacher_data`` or scored once, up front
    (`pipeline.score_pairs`). Returns ``(val, seconds, pairs the teacher scored)``."""
    import pyarrow as pa
    import ray

    t0 = time.perf_counter()
    if cfg.val_teacher_data:
        dataset, _ = read_scores_for(cfg.teacher, cfg.val_teacher_data)
        scored, n_scored = pa.concat_tables(ray.get(dataset.to_arrow_refs())), 0
        unknown = set(scored.column("query_id").to_pylist()) - set(val_data.qrels)
        if unknown:
            raise SchemaError(
                f"{cfg.val_teacher_data}: {len(unknown)} queries (e.g. {sorted(unknown)[0]!r}) have no qrels "
                f"in {cfg.val_data or 'the validation data'} split {cfg.val_split!r}"
            )
    else:
        # Scored before training starts, alone: it may use the training workers' CPUs too (up to one node's).
        val_cpus = max(
            cfg.teacher_cpus,
            min(cfg.teacher_cpus + cfg.cpus_per_worker * cfg.num_workers / cfg.teacher_actors, node_cpus()),
        )
        scored = score_pairs(
            val_pairs,
            cfg.teacher,
            actors=(1, cfg.teacher_actors),
            cpus_per_actor=val_cpus,
            gpus_per_actor=cfg.teacher_gpus if cfg.use_gpu else 0.0,
            batch_size=cfg.teacher_batch_size,
        )
        n_scored = len(val_pairs)
    val = {
        name: scored.column(name).to_pylist()
        for name in ("query_id", "doc_id", "query_text", "doc_text", "teacher_score")
    }
    val["qrels"] = {qid: val_data.qrels[qid] for qid in set(val["query_id"])}
    return val, time.perf_counter() - t0, n_scored


def train_rounds(
    cfg: DistillConfig,
    plan: DistillPlan,
    stage,
    counts: tuple[int, int],
    val: dict,
    train_data,
    train_stream,
    fingerprint: dict[str, Any],
    fail_once_after_step: tuple[str, int] | None = None,
) -> tuple[Any, list[dict]]:
    """Every round's Ray Train run (round 0 on ``stage``, later rounds on the pairs the previous student draws);
    returns the last checkpoint and a summary per round. ``fingerprint``: the run's (`runs.distill_fingerprint`)."""
    from .distill_loop import train_loop_per_worker
    from .raytrain import WholeBlockSplit, fit_torch_trainer, read_history
    from .rounds import sample_round_pairs, sample_round_stream

    checkpoint, first_epoch, rounds, steps_done = None, 0, [], 0
    n_train, n_queries = counts
    for round_index in range(cfg.rounds):
        t0 = time.perf_counter()
        if round_index > 0 and plan.stream_rounds:
            # Pools joined in Ray and drawn block by block. One CPU stays free for Ray Data's own tasks (column
            # projections, joins) that feed the sampler actors.
            drawn, drawn_counts = sample_round_stream(
                cfg, train_stream, checkpoint, round_index, max(node_cpus() - 1.0, 0.5), 4 * cfg.num_workers
            )
            n_train, n_queries = drawn_counts["pairs"], drawn_counts["queries"]
            stage = teacher_stage(drawn, cfg.teacher, **_stage_args(cfg, plan))
        elif round_index > 0:
            # The current student draws the pairs; the teacher scores exactly those, streaming into training.
            sampled = dataclasses.replace(cfg, max_train_queries=None)  # train_data is the sample already
            pairs = sample_round_pairs(sampled, train_data, checkpoint, round_index, cpus=node_cpus())
            n_train, n_queries = len(pairs), len(set(pairs.column("query_id").to_pylist()))
            stage = _training_stage(cfg, plan, pairs)
        sample_s = time.perf_counter() - t0
        outputs = teacher_outputs_dir(cfg, plan.storage)
        persisted_before = persisted_counts(outputs) if outputs else {"scored": 0, "read": 0}
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
                _run_name(cfg, round_index),
                plan.storage,
                bar=bar,
                fingerprint=fingerprint,
                datasets={"train": stage},
                dataset_config=WholeBlockSplit(datasets_to_split=["train"]),
            )
        with checkpoint.as_directory() as directory:
            history = read_history(directory)
        this_round = [h for h in history if h.get("round", 0) == round_index]
        before = [h for h in history if h.get("round", 0) == round_index - 1]
        rounds.append(
            {
                "round": round_index,
                "train_queries": n_queries,
                "train_pairs": n_train,
                # What the workers read in the round's first epoch (0 when the scores came from teacher_data).
                "pairs_scored_by_teacher": 0
                if round_index == 0 and cfg.teacher_data
                else int(this_round[0].get("teacher_rows", 0) if this_round else 0),
                "epochs": epochs,
                "steps_per_epoch": steps_per_epoch,
                "val_before": val_metrics(before[-1]) if before else None,
                "val_after": val_metrics(this_round[-1]) if this_round else None,
                "sample_s": round(sample_s, 1),
                "elapsed_s": round(time.perf_counter() - t0, 1),
            }
        )
        if outputs is not None and not (round_index == 0 and cfg.teacher_data):
            # The teacher's real work: pairs scored, and pairs read back from the persisted outputs (a restart
            # after a failure, or a rerun after a crash).
            persisted = persisted_counts(outputs)
            rounds[-1]["teacher_pairs_scored"] = persisted["scored"] - persisted_before["scored"]
            rounds[-1]["teacher_pairs_read_back"] = persisted["read"] - persisted_before["read"]
        first_epoch += epochs
        steps_done = int(this_round[-1]["step"]) if this_round else steps_done
    return checkpoint, rounds


def _steps_per_epoch(n_train: int, cfg: DistillConfig) -> int:
    steps = n_train // (cfg.batch_size * cfg.num_workers)
    if steps < 1:
        raise ValueError(
            f"{n_train} training pairs are fewer than batch_size x num_workers = "
            f"{cfg.batch_size * cfg.num_workers}; lower batch_size or add queries"
        )
    return steps
