"""Teacher fine-tuning: losses, groups, the differentiable scorer, LoRA merge, saving, and the Ray Train job."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    DEEPSPEED_LORA,
    DOCUMENTS,
    QUERIES,
    TINY_PROMPT,
    assert_reproduces_val_scores,
    distill_config,
    finetune_config,
)
from tiny_families import FAMILIES, build_family

from rabtriever_ray.config import TeacherTrainConfig
from rabtriever_ray.data import DEMO_DATA, BM25Index, read_beir
from rabtriever_ray.families import decoder_layers
from rabtriever_ray.finetune import run_train_teacher
from rabtriever_ray.finetune_loop import (
    AnswerScorer,
    TrainingGroup,
    add_lora,
    build_groups,
    group_batch,
    make_trainable,
    merge_lora,
    save_teacher,
    teacher_losses,
)
from rabtriever_ray.losses import answer_ce, listwise_ce
from rabtriever_ray.models import build_tiny_random_llama, load_causal_lm, prompt_mismatch
from rabtriever_ray.prompts import PromptBuilder
from rabtriever_ray.teacher import GenerativeReranker

ROOT = Path(__file__).resolve().parents[1]


# -- losses -----------------------------------------------------------------------------------------------------


def test_listwise_ce_matches_a_naive_loop():
    torch.manual_seed(0)
    scores = torch.randn(5, 4, dtype=torch.float64)
    mask = torch.tensor(
        [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool
    )
    for temperature in (1.0, 0.5):
        expected = []
        for row, keep in zip(scores, mask):
            kept = [float(s) / temperature for s, k in zip(row, keep) if k]
            log_norm = torch.logsumexp(torch.tensor(kept, dtype=torch.float64), 0)
            expected.append(float(log_norm) - kept[0])
        got = listwise_ce(scores, temperature, mask)
        assert got.item() == pytest.approx(sum(expected) / len(expected), rel=1e-10)
    with pytest.raises(ValueError, match="at least one negative"):
        listwise_ce(torch.zeros(3, 1))


def test_answer_ce_picks_yes_for_positives_and_no_for_negatives():
    logp_yes = torch.tensor([-0.1, -2.0, -3.0])
    logp_no = torch.tensor([-2.5, -0.2, -0.05])
    labels = torch.tensor([1, 0, 1])
    assert answer_ce(logp_yes, logp_no, labels).item() == pytest.approx((0.1 + 0.2 + 3.0) / 3)


# -- groups -----------------------------------------------------------------------------------------------------


def test_groups_are_seeded_positive_first_and_never_use_a_positive_as_negative():
    data = read_beir(DEMO_DATA, "train")
    groups, skipped = build_groups(data, negatives=3, max_queries=30, seed=1)
    again, _ = build_groups(data, negatives=3, max_queries=30, seed=1)
    other, _ = build_groups(data, negatives=3, max_queries=30, seed=2)
    assert skipped == 0 and len(groups) == 30
    assert [g.doc_ids for g in groups] == [g.doc_ids for g in again]
    assert [g.doc_ids for g in groups] != [g.doc_ids for g in other]
    for group in groups:
        positives = {d for d, grade in data.qrels[group.query_id].items() if grade > 0}
        assert group.doc_ids[0] in positives and len(group.doc_ids) == 4 == len(set(group.doc_ids))
        assert not positives & set(group.doc_ids[1:])
        assert group.query_text == data.queries[group.query_id].text
    # bm25:K draws every negative from the query's BM25 top K.
    bm25_groups, _ = build_groups(data, negatives=2, negatives_from="bm25:5", max_queries=30, seed=1)
    hits, _ = BM25Index.from_corpus(data).search([g.query_text for g in bm25_groups], 5)
    for group, top in zip(bm25_groups, hits):
        assert set(group.doc_ids[1:]) <= set(top)


# -- scorer, LoRA, saving ---------------------------------------------------------------------------------------


def _groups() -> list[TrainingGroup]:
    return [
        TrainingGroup(f"q{i}", query, [f"d{j}" for j in range(3)], [DOCUMENTS[(i + j) % 4] for j in range(3)])
        for i, query in enumerate(QUERIES)
    ]


def _reranker_scores(model, tokenizer, groups) -> torch.Tensor:
    teacher = GenerativeReranker(model.eval(), tokenizer, TINY_PROMPT)
    pairs = [(g.query_text, text) for g in groups for text in g.doc_texts]
    return teacher.score([q for q, _ in pairs], [d for _, d in pairs]).score


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_answer_scorer_is_the_rerankers_scoring_function(padding_side):
    model, tokenizer = build_tiny_random_llama(padding_side=padding_side)
    prompts = PromptBuilder(tokenizer, TINY_PROMPT)
    scorer = AnswerScorer(model, prompts)
    groups = _groups()
    score, logp_yes, logp_no = scorer(
        **{k: v for k, v in group_batch(prompts, groups, "cpu").items() if k != "sizes"}
    )
    reference = GenerativeReranker(model.eval(), tokenizer, TINY_PROMPT).score(
        [g.query_text for g in groups for _ in g.doc_texts], [t for g in groups for t in g.doc_texts]
    )
    torch.testing.assert_close(score.detach(), reference.score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logp_yes.detach(), reference.logp_yes, atol=1e-5, rtol=1e-5)
    assert score.requires_grad  # and it trains


def _train_steps(model, tokenizer, steps=3, lr=1e-2):
    prompts = PromptBuilder(tokenizer, TINY_PROMPT)
    scorer = AnswerScorer(model, prompts)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    cfg = TeacherTrainConfig(w_pointwise=0.5)
    batch = group_batch(prompts, _groups(), "cpu")
    losses = []
    for _ in range(steps):
        terms = teacher_losses(scorer, batch, cfg)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        losses.append(terms["listwise"].item())
    return losses


def test_saved_teacher_loads_back_and_scores_like_the_in_memory_model(tmp_path):
    model, tokenizer = build_tiny_random_llama()
    before = _reranker_scores(model, tokenizer, _groups())
    losses = _train_steps(model, tokenizer)
    assert losses[-1] < losses[0]
    trained = _reranker_scores(model, tokenizer, _groups())
    assert not torch.allclose(trained, before)  # the steps changed the teacher
    save_teacher(model, tokenizer, tmp_path / "t", {"prompt": {"max_doc_tokens": 48}})
    loaded, loaded_tokenizer = load_causal_lm(str(tmp_path / "t"), device="cpu")
    torch.testing.assert_close(
        _reranker_scores(loaded, loaded_tokenizer, _groups()), trained, atol=1e-5, rtol=1e-5
    )
    assert (tmp_path / "t" / "model.safetensors").is_file() and not list((tmp_path / "t").glob("*.bin"))


def test_lora_trains_only_adapters_and_merges_into_a_plain_model(tmp_path):
    model, tokenizer = build_tiny_random_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    add_lora(model, TeacherTrainConfig(lora=True, lora_r=4, lora_alpha=8, lora_dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    _train_steps(model, tokenizer)
    with_adapters = _reranker_scores(model, tokenizer, _groups())
    merge_lora(model)
    assert not [n for n, _ in model.named_parameters() if "lora_" in n]
    assert set(dict(model.named_parameters())) == set(base)
    torch.testing.assert_close(
        _reranker_scores(model, tokenizer, _groups()), with_adapters, atol=1e-5, rtol=1e-5
    )
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, base[n])]
    assert changed and all("proj" in n for n in changed)  # the merged adapters moved the projection weights
    save_teacher(model, tokenizer, tmp_path / "t", {"prompt": {}})
    loaded, loaded_tokenizer = load_causal_lm(str(tmp_path / "t"), device="cpu")
    torch.testing.assert_close(
        _reranker_scores(loaded, loaded_tokenizer, _groups()), with_adapters, atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("lora", [False, True])
def test_train_layers_trains_only_the_top_blocks_of_every_family(family, lora):
    model, _ = build_family(family)
    blocks = decoder_layers(model)
    assert len(blocks) == 2
    make_trainable(model, TeacherTrainConfig(train_layers=1, lora=lora, lora_r=4, lora_alpha=8))
    top = {id(p) for p in blocks[-1].parameters()}
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(id(p) in top for _, p in trainable)
    assert all(("lora_" in n) == lora for n, _ in trainable)
    assert not any(p.requires_grad for p in blocks[0].parameters())


def test_train_layers_steps_change_only_the_top_block():
    model, tokenizer = build_tiny_random_llama()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    make_trainable(model, TeacherTrainConfig(train_layers=1))
    losses = _train_steps(model, tokenizer)
    assert losses[-1] < losses[0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, base[n])}
    assert changed == {n for n, _ in model.named_parameters() if n.startswith("model.layers.1.")}


def test_a_teacher_used_with_another_prompt_than_it_was_trained_with_is_flagged(tmp_path):
    (tmp_path / "rabtriever_teacher.json").write_text(
        json.dumps({"prompt": {"doc_label": "Skill", "max_doc_tokens": 48}})
    )
    assert prompt_mismatch(str(tmp_path), {"doc_label": "Skill", "max_doc_tokens": 48}) is None
    message = prompt_mismatch(str(tmp_path), {"doc_label": "Document", "max_doc_tokens": 48})
    assert "prompt.doc_label='Skill'" in message and "'Document'" in message
    assert prompt_mismatch("tiny-random-llama", {"doc_label": "Document"}) is None


# -- the Ray Train job ------------------------------------------------------------------------------------------


@pytest.mark.slow  # a full Ray Train fine-tuning, then a distillation
def test_two_workers_fine_tune_validate_and_the_output_is_a_teacher_for_distillation(
    ray_local, tmp_path, monkeypatch
):
    import pyarrow.parquet as pq

    from rabtriever_ray import pipeline

    # Validation candidates from a run file (every dev query x every skill): read and joined in Ray, sampled
    # (max_val_queries=6) once, and the teacher is scored on exactly those pairs before and after.
    dev = read_beir(DEMO_DATA, "dev")
    run = tmp_path / "dev.trec"
    run.write_text(
        "".join(f"{q} Q0 {d} {r} 0 all\n" for q in dev.queries for r, d in enumerate(dev.corpus, 1))
    )
    scored_queries = []

    score_pairs = pipeline.score_pairs

    def recorded(pairs, *args, **kwargs):
        scored_queries.append(sorted(set(pairs.column("query_id").to_pylist())))
        return score_pairs(pairs, *args, **kwargs)

    monkeypatch.setattr(pipeline, "score_pairs", recorded)
    report = run_train_teacher(
        finetune_config(
            tmp_path,
            "name=two",
            "epochs=4",
            "grad_accum=2",
            "batch_size=1",
            f"val_candidates={run}",
            "train_layers=1",
        )
    )
    written = pq.ParquetDataset(str(tmp_path / "teacher" / "val_scores" / "data")).read(columns=["query_id"])
    assert len(scored_queries) == 2 and scored_queries[0] == scored_queries[1]
    assert (
        sorted(set(written.column("query_id").to_pylist())) == scored_queries[0]
        and len(scored_queries[0]) == 6
    )
    history = report["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3]
    assert report["counts"] == {
        "train_queries": 16,
        "skipped_queries": 0,
        "pairs_per_group": 4,
        "steps_per_epoch": 4,  # 16 groups / (2 workers x 1 group x 2 accumulated micro-batches)
        "steps": 16,
        "val_queries": 6,
        "val_pairs": 6 * 30,
    }
    assert history[-1]["loss/listwise"] < history[0]["loss/listwise"]
    # Below the trained top layer, each worker's pairs ran once: every micro-batch after the first epoch replays.
    assert [h["frozen_replayed"] for h in history] == [0, 8, 16, 24]
    out = tmp_path / "teacher"
    assert json.loads((out / "report.json").read_text())["after"] == report["after"]
    assert set(report["before"]) == set(report["after"]) == {"R@1", "RR@10", "nDCG@10"}
    assert report["before"] != report["after"]
    info = json.loads((out / "rabtriever_teacher.json").read_text())
    assert info["base_model"] == "tiny-random-llama" and info["prompt"]["max_doc_tokens"] == 48

    # The saved model loads as a teacher, and its validation scores are the saved model's own.
    assert_reproduces_val_scores(out, tolerance=1e-4)

    # Distillation accepts it as teacher= and reuses its validation scores.
    from rabtriever_ray.distill import run_distill

    # Relative paths, as users type them: Ray Train workers do not run in this directory.
    monkeypatch.chdir(tmp_path)
    distill = distill_config(tmp_path, "teacher=teacher", "val_teacher_data=teacher/val_scores", "epochs=1")
    result = run_distill(distill)
    assert result["counts"]["val_pairs_scored_by_teacher"] == 0 and result["counts"]["val_queries"] == 6


@pytest.mark.slow  # a full Ray Train fine-tuning (and its resume)
def test_deepspeed_lora_two_workers_resume_after_a_failure(ray_local, tmp_path):
    pytest.importorskip("deepspeed")
    marker = tmp_path / "failed"
    config = finetune_config(tmp_path, *DEEPSPEED_LORA, "epochs=2", "validate_before=false", "max_failures=1")
    report = run_train_teacher(config, fail_once_after_step=(str(marker), 3))
    assert marker.exists()  # rank 0 failed at step 3 and both ranks resumed from the step-2 checkpoint
    assert [h["step"] for h in report["history"]] == [2, 4, 6, 8]
    assert "before" not in report and set(report["after"]) == {"R@1", "RR@10", "nDCG@10"}
    info = json.loads((tmp_path / "teacher" / "rabtriever_teacher.json").read_text())
    assert info["lora"] is True and info["steps"] == 8
    model, _ = load_causal_lm(str(tmp_path / "teacher"), device="cpu")
    assert not [n for n, _ in model.named_parameters() if "lora_" in n]

    # A rerun with the same name and more epochs resumes instead of starting over.
    resumed = run_train_teacher(
        finetune_config(tmp_path, *DEEPSPEED_LORA, "epochs=3", "val_data=none", "overwrite=true")
    )
    assert [h["step"] for h in resumed["history"]] == [2, 4, 6, 8, 10, 12]


def test_job_errors_name_the_problem(tmp_path):
    def job(*args):
        return subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "train_teacher.py"), *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )

    missing = job("--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "a"))
    assert missing.returncode == 2 and "nowhere" in missing.stderr
    too_few = job(
        "--model", "tiny-random-llama", "--max-queries", "3", "batch_size=4", "--out", str(tmp_path / "b")
    )
    assert too_few.returncode == 2 and "fewer than one step" in too_few.stderr
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x").write_text("keep")
    exists = job("--model", "tiny-random-llama", "--out", str(tmp_path / "c"))
    assert exists.returncode == 2 and "--overwrite" in exists.stderr
    bad_key = job("--lr", "fast")
    assert bad_key.returncode == 2 and "lr" in bad_key.stderr


def test_validation_metrics_average_over_the_scored_queries_only():
    import pyarrow as pa

    from rabtriever_ray.finetune import _score_metrics

    table = pa.table({"query_id": ["q1", "q1"], "doc_id": ["d1", "d2"], "teacher_score": [2.0, 1.0]})
    # q2 is judged by the split but was not scored: it must not count as a miss.
    metrics = _score_metrics(table, {"q1": {"d1": 1}, "q2": {"d2": 1}})
    assert metrics["R@1"] == 1.0 and metrics["RR@10"] == 1.0
