"""The distillation's report: final metrics beside the baselines, the bias diagnosis, the per-query cost, the
training curves and the one screen the job ends with.

- `final_metrics`: student (its last validation), teacher and BM25 on the validation candidates, and agreement;
  `bi_encoders`: MiniLM zero-shot and fine-tuned on the same candidates.
- `top1_and_cost`: the most frequent top-1 document of teacher and student, and milliseconds per query of each.
- `plot_curves`: losses and validation metrics per epoch, as a PNG.
- `format_table`, `format_summary`: the markdown table and the closing screen.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

from . import console
from .config import DistillConfig
from .data import BM25Index
from .metrics import HEADLINE_MEASURES, metrics_table, retrieval_metrics, run_from_rows

LOG_FILE = "job.log"  # in out_dir: what Ray and this package log, unless the job runs with verbose=true


def val_metrics(entry: dict) -> dict:
    """The validation metrics of one history entry, without their ``val/`` prefix."""
    return {k.removeprefix("val/"): v for k, v in entry.items() if k.startswith("val/")}


def final_metrics(last: dict, val: dict, val_data) -> dict[str, Any]:
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


def top1_and_cost(cfg: DistillConfig, val: dict, val_data, checkpoint: Path) -> tuple[dict, dict | None]:
    """The bias diagnosis and the cost, measured in this process on the validation candidates.

    ``top1``: for the teacher and the student, the document ranked first for the most validation queries
    (`metrics.top1_concentration`). ``cost``: milliseconds per query for the teacher and for Rabtriever to rank the
    candidates of the same ``cost_queries`` validation queries, sampled as every job samples (`data.sampling`),
    and their ratio (`evaluate.Evaluation`, which times per-query work only: Rabtriever's documents are encoded
    beforehand, as an index holds them); None when ``cost_queries`` is 0.
    """
    from .data import sample_query_ids
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
    sample = sample_query_ids(queries, cfg.cost_queries, cfg.seed)
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


def bi_encoders(cfg: DistillConfig, val: dict, train_data, labelled: int) -> tuple[dict, dict]:
    """The bi-encoder baselines (``cfg.baselines``, `baselines.bi_encoder_rows`) on the validation candidates,
    ``minilm-ft`` trained on the first ``labelled`` queries of the job's training queries (the labelled sample)."""
    from .baselines import bi_encoder_rows

    if not cfg.baselines:
        return {}, {}
    labelled_ids = list(train_data.queries)[:labelled] if train_data is not None else []
    with console.stage("bi-encoder baselines", len(cfg.baselines), "models") as bar:
        rows, details = bi_encoder_rows(cfg.baselines, val, train_data, labelled_ids, cfg.seed)
        bar.update(len(cfg.baselines))
    return {key.replace("-", "_"): metrics for key, metrics in rows.items()}, details


def format_table(final: dict[str, Any]) -> str:
    """The final validation table as markdown: teacher, Rabtriever, the bi-encoders, BM25 and, when the job
    fine-tuned the teacher, the zero-shot teacher; then the student-teacher agreement."""
    tuned = "teacher_zero_shot" in final
    names = {
        "teacher": "teacher (fine-tuned)" if tuned else "teacher",
        "student": "Rabtriever",
        "minilm_ft": "MiniLM (fine-tuned)",
        "minilm": "MiniLM (zero-shot)",
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
    """The one screen the job ends with: the table, agreement, top-1 concentration, the teacher's sanity warnings
    (`sanity.teacher_sanity`), per-query cost, time and where everything was written."""
    counts = report["counts"]
    lines = [f"Validation: {counts['val_queries']} queries, {counts['val_pairs']} candidate pairs"]
    if counts.get("labelled_train_queries") is not None:
        trained = f"Training: {counts['labelled_train_queries']} labelled queries"
        if counts.get("unlabelled_train_queries"):
            trained += f" and {counts['unlabelled_train_queries']} unlabelled ones the teacher scored"
        tuned = (report.get("baselines") or {}).get("minilm-ft", {})
        if "train_s" in tuned:
            trained += f"; MiniLM fine-tuned on the labelled ones in {minutes(tuned['train_s'])}"
        lines.append(trained)
    lines += ["", format_table(report["final"])]
    skipped = {m: d["skipped"] for m, d in (report.get("baselines") or {}).items() if "skipped" in d}
    lines += [f"No {method} row: {reason}" for method, reason in skipped.items()]
    top1 = report.get("top1")
    if top1:
        parts = [
            f"{label} puts {t['doc_id']} first for {t['queries']} of {t['of']} queries"
            for label, t in (("the teacher", top1["teacher"]), ("Rabtriever", top1["student"]))
        ]
        lines.append("Most frequent top-1 document: " + "; ".join(parts))
    # Printed before training too; repeated here, where the user reads the results.
    sanity = report.get("teacher_sanity")
    lines += [f"Teacher sanity warning: {w}" for w in (sanity["warnings"] if sanity else [])]
    cost = report.get("cost")
    if cost:
        lines.append(
            f"Per query ({cost['candidates_per_query']:g} candidates, {cost['queries']} queries timed here): "
            f"teacher {cost['teacher_ms']:,.0f} ms, Rabtriever {cost['student_ms']:,.1f} ms "
            f"({cost['speedup']:g}x cheaper)"
        )
    timings = report["timings_s"]
    spent = f"Time: {minutes(timings['total'])}"
    if timings.get("finetune_teacher"):
        spent += f" (fine-tuning and validating the teacher {minutes(timings['finetune_teacher'])})"
    lines.append(spent)
    out = Path(out_dir)
    written = ["report.json", "checkpoint/", "training_curves.png"]
    if report.get("teacher_finetune"):
        written.insert(2, "teacher/")
    if (out / LOG_FILE).is_file():
        written.append(f"{LOG_FILE} (Ray's log lines)")
    lines.append(f"Wrote {out}/: " + ", ".join(written))
    return "\n".join(lines)


def minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"
