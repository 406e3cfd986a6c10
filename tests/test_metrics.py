import math

import pytest

from rabtriever_ray.metrics import agreement, retrieval_metrics, run_from_rows, spearman

QRELS = {"q1": {"d1": 1}, "q2": {"d3": 1}, "q3": {"d2": 1}, "q4": {"d1": 0}}
RUN = {
    "q1": {"d1": 0.2, "d2": 0.9, "d3": 0.1},  # relevant at rank 2
    "q2": {"d3": 0.9, "d1": 0.5},  # relevant at rank 1
    # q3 missing from the run: counts as 0; q4 has no relevant document: not averaged
}


def test_retrieval_metrics_match_hand_computed_values():
    metrics = retrieval_metrics(RUN, QRELS, ["R@1", "RR@10", "nDCG@10", "R@5"])
    assert metrics["R@1"] == pytest.approx((0 + 1 + 0) / 3)
    assert metrics["RR@10"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert metrics["nDCG@10"] == pytest.approx((1 / math.log2(3) + 1 + 0) / 3)
    assert metrics["R@5"] == pytest.approx(2 / 3)


def test_retrieval_metrics_need_a_judged_query():
    with pytest.raises(ValueError, match="no judged query"):
        retrieval_metrics(RUN, {"q4": {"d1": 0}})


def test_spearman_with_ties_matches_the_textbook_formula():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # Ties: ranks [0.5, 0.5, 2, 3] vs [0, 1, 2, 3] -> Pearson of the ranks.
    ra, rb = [0.5, 0.5, 2, 3], [0, 1, 2, 3]
    ma, mb = sum(ra) / 4, sum(rb) / 4
    cov = sum((a - ma) * (b - mb) for a, b in zip(ra, rb))
    expected = cov / math.sqrt(sum((a - ma) ** 2 for a in ra) * sum((b - mb) ** 2 for b in rb))
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(expected)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_agreement():
    teacher = {"q1": {"a": 3.0, "b": 1.0, "c": 2.0}, "q2": {"a": 0.0, "b": 1.0}}
    student = {"q1": {"a": 0.9, "b": 0.1, "c": 0.5}, "q2": {"a": 1.0, "b": 0.0}}
    result = agreement(student, teacher)
    assert result["top1"] == 0.5 and result["pairs"] == 5
    assert result["spearman_per_query"] == pytest.approx((1.0 + -1.0) / 2)
    assert result["spearman"] == pytest.approx(spearman([0.9, 0.1, 0.5, 1.0, 0.0], [3, 1, 2, 0, 1]))
    with pytest.raises(ValueError, match="share no scored"):
        agreement({"q9": {"a": 1.0}}, teacher)


def test_run_from_rows():
    assert run_from_rows(["q1", "q1", "q2"], ["a", "b", "a"], [1, 2, 3]) == {
        "q1": {"a": 1.0, "b": 2.0},
        "q2": {"a": 3.0},
    }
