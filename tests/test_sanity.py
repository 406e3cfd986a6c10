"""The teacher sanity report against plain per-query loops, and its warnings on hand-built teachers."""

import itertools

import numpy as np
import pyarrow as pa
import pytest

from rabtriever_ray.metrics import run_from_rows, top1_concentration
from rabtriever_ray.sanity import format_sanity, teacher_sanity

N_QUERIES, N_DOCS = 20, 8


def _table(scores: np.ndarray, seed: int = 0) -> pa.Table:
    """A ``(N_QUERIES, N_DOCS)`` score matrix as shuffled rows in two chunks (a query's rows not together)."""
    queries = np.repeat([f"q{i:02d}" for i in range(scores.shape[0])], scores.shape[1])
    docs = np.tile([f"d{j}" for j in range(scores.shape[1])], scores.shape[0])
    order = np.random.default_rng(seed).permutation(scores.size)
    table = pa.table(
        {
            "query_id": pa.array(queries[order], pa.string()),
            "doc_id": pa.array(docs[order], pa.string()),
            "teacher_score": pa.array(scores.ravel()[order], pa.float32()),
        }
    )
    half = table.num_rows // 2
    return pa.concat_tables([table.slice(0, half), table.slice(half)])


def _healthy(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(N_QUERIES, N_DOCS)).astype(np.float32)


def test_figures_equal_plain_per_query_loops():
    scores = np.round(_healthy(), 1)  # a tenth apart: some ties
    sanity = teacher_sanity(_table(scores))
    stds = scores.astype(np.float64).std(axis=1)
    tied = sum(abs(float(a) - float(b)) <= 1e-6 for row in scores for a, b in itertools.combinations(row, 2))
    assert sanity["queries"] == N_QUERIES and sanity["pairs"] == N_QUERIES * N_DOCS
    assert sanity["std_median"] == pytest.approx(np.median(stds))
    assert sanity["flat_queries"] == 0.0
    assert sanity["tied_pairs"] == pytest.approx(tied / (N_QUERIES * N_DOCS * (N_DOCS - 1) / 2))
    low, high, mean = (float(f(scores.astype(np.float64))) for f in (np.min, np.max, np.mean))
    assert sanity["score"] == pytest.approx({"min": low, "max": high, "mean": mean})
    table = _table(_healthy())  # no ties: the same top-1 as the report's
    top1 = teacher_sanity(table)["top1"]
    reference = top1_concentration(
        run_from_rows(*(table.column(c).to_pylist() for c in ("query_id", "doc_id", "teacher_score")))
    )
    assert (top1["doc_id"], top1["queries"]) == (reference["doc_id"], reference["queries"])
    assert top1["uniform_share"] == pytest.approx(1 / N_DOCS)


def test_a_healthy_teacher_has_no_warnings():
    sanity = teacher_sanity(_table(_healthy()))
    assert sanity["warnings"] == [] and sanity["tied_pairs"] == 0.0 and sanity["non_finite"] == 0
    assert format_sanity(sanity).splitlines()[-1] == "  no warnings"


def test_constant_scores_warn_of_flat_scores_and_ties_not_of_a_top1_document():
    sanity = teacher_sanity(_table(np.full((N_QUERIES, N_DOCS), -0.69, np.float32)))
    assert sanity["std_median"] == 0.0 and sanity["flat_queries"] == 1.0 and sanity["tied_pairs"] == 1.0
    assert sanity["top1"]["doc_id"] is None  # every query's best scores tie: no document is ranked first
    flat, ties = sanity["warnings"]
    assert flat.startswith("scores barely vary within queries (median std 0;") and "prompt.preset" in flat
    assert ties.startswith("100% of candidate pairs tie")
    # Variation below 1e-3 is still flat, and is not a tie.
    barely = teacher_sanity(_table(-0.69 + 1e-4 * _healthy()))
    assert [w.split(" (")[0] for w in barely["warnings"]] == ["scores barely vary within queries"]


def test_one_document_first_everywhere_warns():
    scores = _healthy()
    scores[:, 3] = scores.max() + 1  # d3 first for every query
    sanity = teacher_sanity(_table(scores))
    assert sanity["top1"] == {"doc_id": "d3", "queries": N_QUERIES, "share": 1.0, "uniform_share": 1 / N_DOCS}
    assert sanity["warnings"] == [
        "doc d3 is top-1 for 100% of queries (chance: 12%): the teacher may be biased towards it"
    ]
    # Below 5 queries one document first for most of them is chance, not a finding.
    assert teacher_sanity(_table(scores[:4]))["warnings"] == []


def test_ties_and_non_finite_scores_warn():
    scores = np.round(_healthy(), 0)  # whole numbers: most pairs of a query tie
    scores[0, 0] = np.nan
    sanity = teacher_sanity(_table(scores))
    assert sanity["non_finite"] == 1 and sanity["pairs"] == N_QUERIES * N_DOCS - 1
    assert sanity["tied_pairs"] > 0.2
    assert sanity["warnings"][0] == "1 scores are NaN or infinite: the teacher overflowed"
    assert any("of candidate pairs tie (same query" in w for w in sanity["warnings"])
    assert "WARNING: 1 scores are NaN" in format_sanity(sanity)


def test_no_rows():
    sanity = teacher_sanity(_table(_healthy()).slice(0, 0))
    assert sanity["queries"] == 0 and sanity["top1"] is None and sanity["warnings"] == []
    assert format_sanity(sanity) == "Teacher sanity: no scores"
