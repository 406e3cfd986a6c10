"""Quality against what a user would do instead: BM25, MiniLM zero-shot and fine-tuned, the teacher zero-shot and
fine-tuned, and Rabtriever, on one task's validation queries, with what each learnt from and how long it trained.

    python benchmarks/quality.py --task demo                         # the main job: the bundled demo, embedded defaults
    python benchmarks/quality.py --task esconv                       # ESConv strategy selection (../shared/datasets)
    python benchmarks/quality.py --task demo candidates=all max_unlabelled_queries=300   # any distillation key
    python benchmarks/quality.py --task esconv --config configs/esconv_strategy_gpu.yaml   # the GPU recipe
    python benchmarks/quality.py --report runs/demo/report.json      # tabulate a finished distillation

One distillation (`run_distill`) produces every row: it fine-tunes the teacher on the labelled training queries,
distils Rabtriever from it (on the labelled queries and any unlabelled ones), and ranks the same validation
candidates with each method (the report's ``final``). Per method the table gives R@1, RR@10 and nDCG@10, its
training minutes (the teacher's fine-tuning; MiniLM's; the distillation's own, after the teacher's) and the
labelled and unlabelled queries it learnt from. Below it, the student's fidelity to its teacher: the share of the
teacher's R@1 it keeps, Spearman over the validation pairs, top-1 agreement, and the most frequent top-1 document
of each (a student that puts one document first for many queries has learnt a bias, not the teacher).

Tasks:

- ``demo``: `jobs/distill.py` as the README runs it (local Ray, the default model, the bundled demo data: 150
  labelled and 600 unlabelled training queries, 60 validation queries x 30 skills).
- ``esconv``: ``configs/esconv_strategy.yaml`` with ``max_val_queries=300``: ESConv strategy selection, 300
  labelled training queries, the validation on 300 seeded queries of esconv_strategy_dev x all 8 strategies. Needs
  ``../shared/datasets`` (or ``data_dir=``); skipped, saying why, without it. Over an hour on 2 CPU cores.

Writes ``--out`` (default ``benchmarks/results/quality_<task>.json``): the rows, the fidelity figures, the
distillation's counts and timings, the config, the machine and its CPU flags.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each task's distillation config (None: the embedded defaults) and overrides.
TASKS = {
    "demo": (None, []),
    "esconv": (str(ROOT / "configs" / "esconv_strategy.yaml"), ["max_val_queries=300"]),
}
# (report key, label); the report's `final` holds each row's metrics.
METHODS = [
    ("bm25", "BM25"),
    ("minilm", "MiniLM (zero-shot)"),
    ("minilm_ft", "MiniLM (fine-tuned)"),
    ("teacher_zero_shot", "teacher (zero-shot)"),
    ("teacher", "teacher (fine-tuned)"),
    ("student", "Rabtriever"),
]


def rows(report: dict) -> list[dict]:
    """One row per method found in the report: metrics, training minutes, labelled and unlabelled queries."""
    final, counts = report["final"], report["counts"]
    tuned = report.get("teacher_finetune") or {}
    minilm = (report.get("baselines") or {}).get("minilm-ft", {})
    labelled = counts.get("labelled_train_queries") or counts["train_queries"]
    training = {
        "bm25": (0.0, 0, 0),
        "minilm": (0.0, 0, 0),
        "minilm_ft": (minilm.get("train_s", 0.0) / 60, minilm.get("queries", 0), 0),
        "teacher_zero_shot": (0.0, 0, 0),
        "teacher": (
            tuned.get("timings_s", {}).get("train", 0.0) / 60,
            tuned.get("counts", {}).get("train_queries", 0),
            0,
        ),
        "student": (
            report["timings_s"]["train_with_streaming_teacher"] / 60,
            labelled,
            counts.get("unlabelled_train_queries") or 0,
        ),
    }
    out = []
    for key, label in METHODS:
        if key not in final:
            continue
        minutes, n_labelled, n_unlabelled = training[key]
        out.append(
            {
                "method": label,
                **final[key],
                "train_min": round(minutes, 2),
                "labelled_queries": n_labelled,
                "unlabelled_queries": n_unlabelled,
            }
        )
    return out


def fidelity(report: dict) -> dict:
    """How much of its teacher the student keeps, on the same validation pairs."""
    final, top1 = report["final"], report.get("top1") or {}
    teacher_r1 = final["teacher"]["R@1"]
    return {
        "r1_kept": round(final["student"]["R@1"] / teacher_r1, 3) if teacher_r1 else None,
        "ndcg10_kept": round(final["student"]["nDCG@10"] / final["teacher"]["nDCG@10"], 3)
        if final["teacher"]["nDCG@10"]
        else None,
        "spearman": round(final["agreement"]["spearman"], 3),
        "top1_agreement": round(final["agreement"]["top1"], 3),
        "top1_teacher": top1.get("teacher"),
        "top1_student": top1.get("student"),
    }


def table(result: dict) -> str:
    header = "| method | R@1 | RR@10 | nDCG@10 | training (min) | labelled queries | unlabelled queries |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(
            f"| {row['method']} | {row['R@1']:.3f} | {row['RR@10']:.3f} | {row['nDCG@10']:.3f} | "
            f"{row['train_min']:.1f} | {row['labelled_queries']} | {row['unlabelled_queries']} |"
        )
    f = result["fidelity"]

    def share(kept):
        return "n/a" if kept is None else f"{kept:.0%}"  # the teacher scored 0

    lines.append("")
    lines.append(
        f"Rabtriever keeps {share(f['r1_kept'])} of the teacher's R@1 ({share(f['ndcg10_kept'])} of its "
        f"nDCG@10); Spearman {f['spearman']:.3f}; the same top-1 document for {f['top1_agreement']:.0%} of queries"
    )
    if f["top1_teacher"] and f["top1_student"]:
        t, s = f["top1_teacher"], f["top1_student"]
        lines.append(
            f"Most frequent top-1 document: teacher {t['doc_id']} ({t['queries']} of {t['of']}), "
            f"Rabtriever {s['doc_id']} ({s['queries']} of {s['of']})"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--task", choices=sorted(TASKS), default="demo")
    parser.add_argument("--config", default=None, help="a distillation YAML instead of the task's")
    parser.add_argument("--report", default=None, help="a finished distillation's report.json (nothing runs)")
    parser.add_argument(
        "--out", default=None, help="results JSON (default benchmarks/results/quality_<task>.json)"
    )
    parser.add_argument("overrides", nargs="*", help="distillation keys, key=value")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.report:
        report = json.loads(Path(args.report).read_text())
    else:
        from rabtriever_ray.config import DistillConfig, parse_job_args
        from rabtriever_ray.data import data_root
        from rabtriever_ray.distill import run_distill

        config, overrides = TASKS[args.task]
        config = args.config or config
        argv = [
            *(["--config", config] if config else []),
            *overrides,
            f"name=quality_{args.task}",
            *args.overrides,
        ]
        cfg = parse_job_args(DistillConfig, argv)
        for root in {data_root(cfg.data_dir, cfg.train_data), data_root(cfg.data_dir, cfg.val_data)}:
            if not root.is_dir():
                print(f"skipped: {root} is missing (the {args.task} task's data; set data_dir=)")
                return
        report = run_distill(cfg)
    from rabtriever_ray.precision import cpu_flags

    result = {
        "task": args.task if not args.report else None,
        "report": args.report,
        "rows": rows(report),
        "fidelity": fidelity(report),
        "counts": report["counts"],
        "timings_s": report["timings_s"],
        "rounds": [
            {k: r.get(k) for k in ("round", "train_queries", "train_pairs", "val_after")}
            for r in report.get("rounds", [])
        ],
        "config": report["config"],
        "wall_s": round(time.perf_counter() - started, 1),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "python": sys.version.split()[0],
        },
        "cpu_flags": cpu_flags(),
    }
    print(table(result))
    out = Path(args.out or f"benchmarks/results/quality_{args.task}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
