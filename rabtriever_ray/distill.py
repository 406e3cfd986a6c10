"""The distillation run: teacher stage -> Ray Train -> checkpoint, report and curves.

`run_distill(config)`:

1. reads the train and validation BEIR data and builds candidate pairs (training mode adds the positives);
2. scores the validation pairs once with the teacher stage, and hands the *lazy* teacher stage over the training
   pairs to Ray Train as ``datasets={"train": ...}``, so teacher actors and training workers run at the same time;
3. runs `train.train_loop_per_worker` under ``TorchTrainer`` (DDP; ``RunConfig(name, storage_path)``, so a rerun
   with the same name resumes from the latest checkpoint; ``FailureConfig`` recovers failed workers);
4. writes ``out_dir/report.json`` (config, per-epoch history, final validation metrics of student, teacher and
   BM25, agreement, timings, counts), ``out_dir/checkpoint/`` and ``out_dir/training_curves.png``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from .config import DistillConfig, TeacherConfig, to_dict
from .data import DEMO_DATA, build_pairs, read_beir
from .data.candidates import BM25Index
from .io import init_ray, write_json_atomic
from .metrics import retrieval_metrics, run_from_rows
from .models import model_hidden_size
from .pipeline import SchemaError, pairs_dataset, read_teacher_scores, teacher_stage

METRICS = ("R@1", "RR@10", "nDCG@10")


def _data_root(cfg: DistillConfig, sub: str) -> Path:
    root = Path(cfg.data_dir) if cfg.data_dir else DEMO_DATA
    return root / sub if sub else root


def run_distill(cfg: DistillConfig, fail_once_after_step: tuple[str, int] | None = None) -> dict[str, Any]:
    """Run one distillation (see the module docstring); returns the report that is also written to disk."""
    import json

    import pyarrow as pa
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .train import train_loop_per_worker

    started = time.perf_counter()
    out_dir = Path(cfg.out_dir or f"runs/{cfg.name}").resolve()
    storage = Path(cfg.storage_path).resolve() if cfg.storage_path else out_dir / "ray"
    val_data = read_beir(_data_root(cfg, cfg.val_data), cfg.val_split)
    val_pairs = build_pairs(val_data, cfg.val_candidates, cfg.max_val_queries, cfg.seed)
    init_ray()
    if cfg.teacher_data:
        # Pre-scored pairs: checked against the teacher's hidden size and spec before anything runs.
        train_stage, manifest = read_teacher_scores(
            cfg.teacher_data, hidden_size=model_hidden_size(cfg.teacher)
        )
        if manifest["teacher"]["model"] != cfg.teacher:
            raise SchemaError(
                f"{cfg.teacher_data}: scored by teacher {manifest['teacher']['model']!r}, but teacher={cfg.teacher!r}"
            )
        n_train, n_train_queries = manifest["rows"], manifest["queries"]
    else:
        train_data = read_beir(_data_root(cfg, cfg.train_data), cfg.train_split)
        train_pairs = build_pairs(train_data, cfg.candidates, cfg.max_train_queries, cfg.seed, training=True)
        n_train, n_train_queries = len(train_pairs), len(set(train_pairs.column("query_id").to_pylist()))
    steps_per_epoch = n_train // (cfg.batch_size * cfg.num_workers)
    if steps_per_epoch < 1:
        raise ValueError(
            f"{n_train} training pairs are fewer than batch_size x num_workers = "
            f"{cfg.batch_size * cfg.num_workers}; lower batch_size or add queries"
        )
    teacher = TeacherConfig(model=cfg.teacher, prompt=cfg.prompt, max_batch_tokens=cfg.max_batch_tokens)
    stage_args = {
        "actors": (1, cfg.teacher_actors),
        "cpus_per_actor": cfg.teacher_cpus,
        "batch_size": cfg.teacher_batch_size,
        "gpus_per_actor": 1.0 if cfg.use_gpu else 0.0,
    }
    # Validation is scored before training starts, alone: it may use the training workers' CPUs too (up to one
    # node's), and document-major order lets each teacher batch run a shared document prefix for many queries.
    largest_node = max(n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n["Alive"])
    val_cpus = max(
        cfg.teacher_cpus,
        min(cfg.teacher_cpus + cfg.cpus_per_worker * cfg.num_workers / cfg.teacher_actors, largest_node),
    )
    val_sorted = val_pairs.sort_by([("doc_id", "ascending"), ("query_id", "ascending")])
    t0 = time.perf_counter()
    val_stage = teacher_stage(
        pairs_dataset(val_sorted, cfg.teacher_batch_size),
        teacher,
        **{**stage_args, "cpus_per_actor": val_cpus},
    )
    val_scored = pa.concat_tables(ray.get(val_stage.to_arrow_refs()))
    val_teacher_s = time.perf_counter() - t0
    val = {
        name: val_scored.column(name).to_pylist()
        for name in ("query_id", "doc_id", "query_text", "doc_text", "teacher_score")
    }
    val["qrels"] = {qid: val_data.qrels[qid] for qid in set(val["query_id"])}
    if not cfg.teacher_data:
        train_stage = teacher_stage(
            pairs_dataset(train_pairs, rows_per_block=cfg.teacher_batch_size), teacher, **stage_args
        )

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "distill": cfg,
            "steps_per_epoch": steps_per_epoch,
            "val": val,
            "fail_once_after_step": fail_once_after_step,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker},
        ),
        datasets={"train": train_stage},
        dataset_config=DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
        ),
    )
    t0 = time.perf_counter()
    result = trainer.fit()
    train_s = time.perf_counter() - t0
    if result.checkpoint is None:
        raise RuntimeError(f"training finished without a checkpoint: {result.error}")

    out_dir.mkdir(parents=True, exist_ok=True)
    with result.checkpoint.as_directory() as directory:
        staging = out_dir / ".checkpoint.partial"
        shutil.rmtree(staging, ignore_errors=True)
        shutil.copytree(directory, staging)
    shutil.rmtree(out_dir / "checkpoint", ignore_errors=True)
    staging.rename(out_dir / "checkpoint")
    history = json.loads((out_dir / "checkpoint" / "history.json").read_text())

    final = _final_metrics(history[-1], val, val_data)
    report = {
        "config": to_dict(cfg),
        "final": final,
        "history": history,
        "counts": {
            "train_queries": n_train_queries,
            "train_pairs": n_train,
            "train_pairs_scored_by_teacher": 0 if cfg.teacher_data else n_train,
            "val_queries": len(val["qrels"]),
            "val_pairs_scored_by_teacher": len(val_pairs),
            "steps_per_epoch": steps_per_epoch,
        },
        "timings_s": {
            "val_teacher": round(val_teacher_s, 1),
            "train_with_streaming_teacher": round(train_s, 1),
            "total": round(time.perf_counter() - started, 1),
        },
    }
    write_json_atomic(out_dir / "report.json", report)
    plot_curves(history, out_dir / "training_curves.png")
    return report


def _final_metrics(last: dict, val: dict, val_data) -> dict[str, Any]:
    """Student (from the last validation), teacher and BM25 on the validation candidates."""
    teacher_run = run_from_rows(val["query_id"], val["doc_id"], val["teacher_score"])
    bm25 = BM25Index.from_corpus(val_data)
    queries = sorted(set(val["query_id"]))
    hits, scores = bm25.search([val_data.queries[q].text for q in queries], len(val_data.corpus))
    bm25_full = {q: dict(zip(h, map(float, s))) for q, h, s in zip(queries, hits, scores)}
    bm25_run = run_from_rows(
        val["query_id"],
        val["doc_id"],
        [bm25_full[q].get(d, 0.0) for q, d in zip(val["query_id"], val["doc_id"])],
    )
    student = {m: last[f"val/{m}"] for m in METRICS}
    return {
        "student": student,
        "teacher": retrieval_metrics(teacher_run, val["qrels"], METRICS),
        "bm25": retrieval_metrics(bm25_run, val["qrels"], METRICS),
        "agreement": {"spearman": last["val/spearman"], "top1": last["val/top1_agreement"]},
    }


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
    """The final validation table as markdown."""
    lines = ["| method | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for method in ("teacher", "student", "bm25"):
        lines.append(f"| {method} | " + " | ".join(f"{final[method][m]:.3f}" for m in METRICS) + " |")
    agree = final["agreement"]
    lines.append(f"\nstudent-teacher agreement: Spearman {agree['spearman']:.3f}, top-1 {agree['top1']:.3f}")
    return "\n".join(lines)
