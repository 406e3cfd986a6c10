"""Evaluation: retrieval metrics against qrels (ir-measures) and student-teacher agreement.

Runs and qrels are ``{query_id: {doc_id: value}}``. `retrieval_metrics` averages over every judged query with at
least one relevant document; a query missing from the run counts as 0 (ir-measures alone would skip it).

Ties. Every ranking here orders a query's documents by score, highest first, and equal scores by document id,
smallest first (Python string order); a NaN score ranks last (`ranking`). Ties are common: an untrained
predictor, a biased zero-shot teacher, BM25's zero scores, a frequency prior. ir-measures hands each measure to
a provider that breaks ties its own way (pytrec_eval, like trec_eval, puts the largest document id first; the
MS MARCO provider, which computes ``RR@k``, the smallest), so one report could read the same tied documents in
two orders: R@1 = 0 next to RR@10 = 1. `retrieval_metrics` therefore passes each query's documents with
strictly decreasing scores in this order (`strictly_ranked`): no provider sees a tie and every measure reads
the same ranking. `agreement`'s top-1 document is the first of this ranking.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

DEFAULT_MEASURES = ("nDCG@10", "RR@10", "R@1", "R@5", "R@100")
HEADLINE_MEASURES = ("R@1", "RR@10", "nDCG@10")  # the training jobs' validation tables and reports

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]


def _rank_key(item: tuple[str, float]) -> tuple[float, str]:
    doc_id, score = item
    score = float(score)
    return (math.inf if math.isnan(score) else -score, doc_id)


def ranking(docs: Mapping[str, float]) -> list[str]:
    """One query's doc ids, best first: score descending, then doc id ascending; NaN scores last."""
    return [doc_id for doc_id, _ in sorted(docs.items(), key=_rank_key)]


def strictly_ranked(run: Run) -> dict[str, dict[str, float]]:
    """The run with each query's scores replaced by ``n, n - 1, ..., 1`` in `ranking` order (no ties left)."""
    out = {}
    for qid, docs in run.items():
        order = ranking(docs)
        out[qid] = {doc_id: float(len(order) - i) for i, doc_id in enumerate(order)}
    return out


def retrieval_metrics(run: Run, qrels: Qrels, measures: Sequence[str] = DEFAULT_MEASURES) -> dict[str, float]:
    """Mean of each measure (ir-measures names, e.g. ``nDCG@10``, ``RR@10``, ``R@1``) over the judged queries."""
    import ir_measures

    parsed = [ir_measures.parse_measure(m) for m in measures]
    judged = {
        qid: {d: int(g) for d, g in docs.items()}
        for qid, docs in qrels.items()
        if any(g > 0 for g in docs.values())
    }
    if not judged:
        raise ValueError("no judged query with a relevant document: cannot compute retrieval metrics")
    scored = strictly_ranked({qid: run[qid] for qid in judged if run.get(qid)})
    totals = dict.fromkeys(measures, 0.0)
    names = dict(zip(parsed, measures))
    for metric in ir_measures.iter_calc(parsed, judged, scored):
        totals[names[metric.measure]] += metric.value
    return {name: totals[name] / len(judged) for name in measures}


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 0-based."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and sorted_values[end + 1] == sorted_values[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0
        start = end + 1
    return ranks


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation with tie-averaged ranks; NaN when either side is constant."""
    ra, rb = _ranks(np.asarray(a, dtype=np.float64)), _ranks(np.asarray(b, dtype=np.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def agreement(student: Run, teacher: Run) -> dict[str, float]:
    """How closely student scores follow the teacher's on the same (query, document) pairs.

    ``spearman``: over all scored pairs pooled; ``spearman_per_query``: mean over queries with >= 2 candidates;
    ``top1``: share of queries whose best document (the first of `ranking`: ties go to the smallest doc id) is
    the same for both.
    """
    pooled_s, pooled_t, per_query, top1 = [], [], [], []
    for qid, teacher_docs in teacher.items():
        docs = [d for d in teacher_docs if d in student.get(qid, {})]
        if not docs:
            continue
        s = [student[qid][d] for d in docs]
        t = [teacher_docs[d] for d in docs]
        pooled_s += s
        pooled_t += t
        if len(docs) >= 2:
            value = spearman(s, t)
            if not np.isnan(value):
                per_query.append(value)
        best_student = min(zip(docs, s), key=_rank_key)[0]
        best_teacher = min(zip(docs, t), key=_rank_key)[0]
        top1.append(best_student == best_teacher)
    if not top1:
        raise ValueError("student and teacher share no scored (query, document) pair")
    return {
        "spearman": spearman(pooled_s, pooled_t),
        "spearman_per_query": float(np.mean(per_query)) if per_query else float("nan"),
        "top1": float(np.mean(top1)),
        "pairs": len(pooled_s),
    }


def run_from_rows(
    query_ids: Sequence[str], doc_ids: Sequence[str], scores: Sequence[float]
) -> dict[str, dict[str, float]]:
    """Aligned columns -> ``{query_id: {doc_id: score}}``."""
    run: dict[str, dict[str, float]] = {}
    for qid, did, score in zip(query_ids, doc_ids, scores, strict=True):
        run.setdefault(qid, {})[did] = float(score)
    return run


def top1_concentration(run: Run) -> dict[str, Any]:
    """How often one document comes first: ``{"doc_id", "queries", "of"}`` for the document that is the top-1
    (`ranking` order) of the most queries. A judge biased towards one document puts it first for most queries."""
    firsts = Counter(ranking(docs)[0] for docs in run.values() if docs)
    if not firsts:
        return {"doc_id": None, "queries": 0, "of": 0}
    doc_id, count = min(firsts.items(), key=lambda item: (-item[1], item[0]))
    return {"doc_id": doc_id, "queries": count, "of": sum(firsts.values())}


def metrics_table(
    rows: Mapping[str, Mapping[str, float]],
    first_header: str = "method",
    measures: Sequence[str] | None = None,
    extra: Mapping[str, Sequence[str]] | None = None,
) -> str:
    """A markdown table: one row per name in ``rows`` (insertion order), one column per measure (3 decimals).

    ``measures`` default to the first row's keys; ``extra`` adds columns of preformatted text
    (``{"ms/query": ["12.3", ...]}``, one value per row).
    """
    if measures is None:
        measures = list(next(iter(rows.values()))) if rows else []
    extra = extra or {}
    header = [first_header, *measures, *extra]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    for i, (name, values) in enumerate(rows.items()):
        cells = [name, *(f"{values[m]:.3f}" for m in measures), *(column[i] for column in extra.values())]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
