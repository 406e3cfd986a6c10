import math
import random

import ir_measures
import pytest

from rabtriever_ray.metrics import (
    agreement,
    ranking,
    retrieval_metrics,
    run_from_rows,
    spearman,
    strictly_ranked,
    top1_concentration,
)

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


@pytest.mark.parametrize("k", [3, 5])
def test_tied_documents_rank_by_doc_id_for_every_measure(k):
    tied = {f"d{i}": 0.5 for i in range(1, k + 1)}
    first = retrieval_metrics({"q": tied}, {"q": {"d1": 1}}, ["R@1", "RR@10", "nDCG@10"])
    assert first == pytest.approx({"R@1": 1.0, "RR@10": 1.0, "nDCG@10": 1.0})
    last = retrieval_metrics({"q": tied}, {"q": {f"d{k}": 1}}, ["R@1", "RR@10", "nDCG@10"])
    assert last == pytest.approx({"R@1": 0.0, "RR@10": 1 / k, "nDCG@10": 1 / math.log2(k + 1)})


def test_ranking_is_score_descending_then_doc_id_in_string_order():
    assert ranking({"d9": 1.0, "d2": 1.0, "d10": 1.0, "a": 3.0, "z": math.nan, "b": -1.0}) == [
        "a",
        "d10",
        "d2",
        "d9",
        "b",
        "z",
    ]
    assert strictly_ranked({"q": {"b": 0.0, "a": 0.0, "c": 2.0}}) == {"q": {"c": 3.0, "a": 2.0, "b": 1.0}}


def test_several_relevant_documents_graded():
    # Ranking: c (0), a (2), b (1, tied with a: after it by id), z (0); x (1) is not retrieved.
    qrels = {"q": {"a": 2, "b": 1, "c": 0, "x": 1}}
    run = {"q": {"c": 0.9, "b": 0.8, "a": 0.8, "z": 0.1}}
    metrics = retrieval_metrics(run, qrels, ["R@1", "R@2", "R@3", "R@5", "RR@10", "nDCG@10"])
    dcg = 2 / math.log2(3) + 1 / math.log2(4)  # linear gain (trec_eval's), log2(rank + 1) discount
    ideal = 2 + 1 / math.log2(3) + 1 / math.log2(4)  # grades 2, 1, 1
    assert metrics["nDCG@10"] == pytest.approx(dcg / ideal)
    assert [metrics[f"R@{k}"] for k in (1, 2, 3, 5)] == pytest.approx([0, 1 / 3, 2 / 3, 2 / 3])
    assert metrics["RR@10"] == pytest.approx(1 / 2)


def test_several_relevant_documents_binary_all_tied():
    # Ranking a, b, c, d (all tied); b and d relevant.
    run = {"q": dict.fromkeys("dcba", 1.0)}
    metrics = retrieval_metrics(run, {"q": {"b": 1, "d": 1}}, ["R@1", "R@2", "R@5", "RR@10", "nDCG@10"])
    assert [metrics[f"R@{k}"] for k in (1, 2, 5)] == pytest.approx([0, 1 / 2, 1])
    assert metrics["RR@10"] == pytest.approx(1 / 2)
    assert metrics["nDCG@10"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3)))


def _reference(order: list[str], grades: dict[str, int]) -> dict[str, float]:
    """Plain-Python R@k, RR@k, nDCG@k (linear gain) of one ranked list."""
    relevant = {d for d, g in grades.items() if g > 0}
    hits = [d in relevant for d in order]
    ideal = sorted((g for g in grades.values() if g > 0), reverse=True)
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:10]))
    out = {f"R@{k}": sum(hits[:k]) / len(relevant) for k in (1, 5, 100)}
    out["RR@10"] = next((1 / (i + 1) for i, hit in enumerate(hits[:10]) if hit), 0.0)
    out["RR"] = next((1 / (i + 1) for i, hit in enumerate(hits) if hit), 0.0)
    out["nDCG@10"] = sum(grades.get(d, 0) / math.log2(i + 2) for i, d in enumerate(order[:10])) / idcg
    return out


def _tied_run_and_qrels(seed: int, n_queries: int = 40):
    rng = random.Random(seed)
    run, qrels = {}, {}
    for q in range(n_queries):
        docs = [f"d{j}" for j in rng.sample(range(30), rng.randint(1, 15))]
        run[f"q{q}"] = {d: float(rng.choice([0, 0, 1, 2])) for d in docs}  # mostly ties
        judged = rng.sample(docs + ["unretrieved"], min(3, len(docs) + 1))
        qrels[f"q{q}"] = {d: rng.choice([1, 1, 2]) for d in judged}
    return run, qrels


def test_every_measure_reads_the_same_ranking_as_a_plain_reference():
    run, qrels = _tied_run_and_qrels(seed=0)
    measures = ["nDCG@10", "RR@10", "RR", "R@1", "R@5", "R@100"]
    expected = dict.fromkeys(measures, 0.0)
    for qid, grades in qrels.items():
        order = sorted(run[qid], key=lambda d: (-run[qid][d], d))
        for name, value in _reference(order, grades).items():
            expected[name] += value / len(qrels)
    assert retrieval_metrics(run, qrels, measures) == pytest.approx(expected)


def test_every_provider_gives_the_same_values_on_the_strictly_ranked_run():
    # ir-measures picks one provider per measure (R@k, nDCG@k: pytrec_eval; RR@k: msmarco); after
    # `strictly_ranked` every installed provider that supports a measure agrees with the reference.
    run, qrels = _tied_run_and_qrels(seed=1)
    ranked = strictly_ranked(run)
    checked = set()
    for name in ["nDCG@10", "RR@10", "RR", "R@1", "R@5", "R@100"]:
        measure = ir_measures.parse_measure(name)
        for provider_name, provider in ir_measures.providers.registry.items():
            if not (provider.is_available() and provider.supports(measure)):
                continue
            checked.add((provider_name, name))
            values = {m.query_id: m.value for m in provider.iter_calc([measure], qrels, ranked)}
            for qid, grades in qrels.items():
                order = sorted(run[qid], key=lambda d: (-run[qid][d], d))
                expected = _reference(order, grades)[name]
                assert values[qid] == pytest.approx(expected), f"{provider_name} {name} {qid}"
    assert {("pytrec_eval", "R@1"), ("pytrec_eval", "RR"), ("msmarco", "RR")} <= checked


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


def test_agreement_top1_breaks_ties_by_the_smallest_doc_id():
    teacher = {
        "q1": {"b": 1.0, "a": 1.0, "c": 0.0},
        "q2": {"b": 2.0, "a": 1.0},
        "q3": {"d9": 1.0, "d10": 1.0},
    }
    student = {"q1": dict.fromkeys("cba", 0.5), "q2": {"b": 1.0, "a": 1.0}, "q3": {"d9": 0.0, "d10": 0.0}}
    # q1: both pick a; q2: student a (tie), teacher b; q3: both pick d10 ("d10" < "d9").
    assert agreement(student, teacher)["top1"] == pytest.approx(2 / 3)
    assert agreement({"q2": {"a": 0.0, "b": 0.0}}, {"q2": {"a": 0.0, "b": 1.0}})["top1"] == 0.0


def test_run_from_rows():
    assert run_from_rows(["q1", "q1", "q2"], ["a", "b", "a"], [1, 2, 3]) == {
        "q1": {"a": 1.0, "b": 2.0},
        "q2": {"a": 3.0},
    }


def test_top1_concentration_counts_each_querys_first_document_as_ranking_orders_it():
    rng = random.Random(0)
    docs = ["a", "b", "c", "d"]
    run = {f"q{i}": {d: float(rng.randint(0, 2)) for d in docs} for i in range(40)}  # many ties
    firsts: dict[str, int] = {}
    for scores in run.values():  # naive: highest score, ties to the smallest id
        best = max(scores.values())
        first = min(d for d, s in scores.items() if s == best)
        firsts[first] = firsts.get(first, 0) + 1
    top = max(sorted(firsts), key=lambda d: firsts[d])
    assert top1_concentration(run) == {"doc_id": top, "queries": firsts[top], "of": 40}
    assert top1_concentration({"q": {"x": 1.0, "y": 2.0}, "r": {"x": 3.0, "y": 0.0}}) == {
        "doc_id": "x",
        "queries": 1,
        "of": 2,
    }  # a tie in counts goes to the smallest id
    assert top1_concentration({}) == {"doc_id": None, "queries": 0, "of": 0}
