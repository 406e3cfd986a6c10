import dataclasses
from dataclasses import replace

import pytest
import torch
from helpers import DOCUMENTS, QUERIES, TINY_PROMPT

from rabtriever_ray.config import PromptConfig, TeacherConfig, load_config
from rabtriever_ray.prompts import PromptBuilder
from rabtriever_ray.teacher import GenerativeReranker, PrefixCache


def test_scores_have_documented_shapes_and_meaning(tiny_teacher):
    out = tiny_teacher.score(QUERIES, DOCUMENTS)
    n = len(QUERIES)
    assert out.score.shape == out.logp_yes.shape == out.logp_no.shape == (n,)
    assert out.hidden.shape == (n, 64) and out.hidden.dtype == torch.float32
    assert out.query_tokens.dtype == out.doc_tokens.dtype == torch.int32
    assert out.truncated.dtype == torch.bool and out.truncated.tolist()[:3] == [True, False, True]
    assert (out.logp_yes < 0).all() and (out.logp_no < 0).all()
    torch.testing.assert_close(out.score, out.logp_yes - out.logp_no, atol=1e-5, rtol=1e-5)


def test_lm_head_of_final_norm_of_hidden_reproduces_the_logits(tiny_teacher):
    model = tiny_teacher.model
    out = tiny_teacher.score(QUERIES, DOCUMENTS)
    prompts = tiny_teacher.prompts.pair_prompts(QUERIES, DOCUMENTS)
    for row, ids in enumerate(prompts.input_ids):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
            reproduced = model.lm_head(model.model.norm(out.hidden[row]))
        torch.testing.assert_close(reproduced, logits, atol=1e-5, rtol=1e-5)
        logp = torch.log_softmax(logits, -1)
        assert out.logp_yes[row].item() == pytest.approx(logp[tiny_teacher.prompts.yes_id].item(), abs=1e-5)
        assert out.logp_no[row].item() == pytest.approx(logp[tiny_teacher.prompts.no_id].item(), abs=1e-5)


def test_batched_equals_one_pair_at_a_time(padded_teacher):
    padded_teacher.max_batch_tokens = 4096  # everything in one padded batch
    batched = padded_teacher.score(QUERIES, DOCUMENTS)
    lengths = [len(ids) for ids in padded_teacher.prompts.pair_prompts(QUERIES, DOCUMENTS).input_ids]
    assert len(set(lengths)) > 1  # padding really happens
    for row, (query, doc) in enumerate(zip(QUERIES, DOCUMENTS)):
        single = padded_teacher.score([query], [doc])
        for name in ("score", "logp_yes", "logp_no", "hidden"):
            torch.testing.assert_close(
                getattr(batched, name)[row], getattr(single, name)[0], atol=1e-4, rtol=1e-4
            )


def test_small_token_budget_gives_the_same_scores(tiny_teacher):
    big = tiny_teacher.score(QUERIES, DOCUMENTS)
    tiny_teacher.max_batch_tokens = 1
    try:
        small = tiny_teacher.score(QUERIES, DOCUMENTS)
    finally:
        tiny_teacher.max_batch_tokens = 8192
    torch.testing.assert_close(small.score, big.score, atol=1e-4, rtol=1e-4)


def test_from_config(tmp_path):
    path = tmp_path / "teacher.yaml"
    path.write_text(
        "model: tiny-random-llama\nprompt:\n  instruction: Does the abstract support or refute the claim?\n"
    )
    teacher = GenerativeReranker.from_config(load_config(TeacherConfig, path), device="cpu")
    assert teacher.prompts.config.instruction.startswith("Does the abstract")
    assert teacher.score(["claim"], ["abstract"]).score.shape == (1,)


def test_empty_input_gives_empty_output(tiny_teacher):
    out = tiny_teacher.score([], [])
    assert out.score.shape == (0,) and out.hidden.shape == (0, 64)


@pytest.mark.parametrize("instruction_first", [False, True])
def test_shared_prefixes_give_the_same_scores_with_fewer_tokens(padded_teacher, instruction_first):
    """Pairs sharing a document (and all sharing the template) run the shared prefix once."""
    padded_teacher.prompts = PromptBuilder(
        padded_teacher.tokenizer, replace(TINY_PROMPT, instruction_first=instruction_first)
    )
    queries = QUERIES * 3
    documents = [DOCUMENTS[0]] * 4 + [DOCUMENTS[1]] * 4 + DOCUMENTS  # two shared-document groups + singletons
    padded_teacher.share_prefix = True
    padded_teacher.stats = {}
    shared = padded_teacher.score(queries, documents)
    shared_tokens = padded_teacher.stats["tokens"]
    padded_teacher.share_prefix = False
    padded_teacher.stats = {}
    plain = padded_teacher.score(queries, documents)
    assert padded_teacher.stats["tokens"] == sum(
        len(i) for i in padded_teacher.prompts.pair_prompts(queries, documents).input_ids
    )
    assert shared_tokens < padded_teacher.stats["tokens"]
    for name in ("score", "logp_yes", "logp_no", "hidden"):
        torch.testing.assert_close(getattr(shared, name), getattr(plain, name), atol=1e-4, rtol=1e-4)
    single = torch.stack([padded_teacher.score([q], [d]).score[0] for q, d in zip(queries, documents)])
    torch.testing.assert_close(shared.score, single, atol=1e-4, rtol=1e-4)


def test_a_document_seen_by_an_earlier_call_runs_only_its_pairs_own_tokens(padded_teacher):
    """Document prefixes stay in the teacher's prefix cache: a later call runs only each pair's own tokens (its
    query and the answer prompt), with the scores of a teacher that keeps nothing between calls."""
    queries, documents = QUERIES * 2, [DOCUMENTS[0]] * len(QUERIES) + [DOCUMENTS[1]] * len(QUERIES)
    padded_teacher.score(queries, documents)  # each document shared within the call: its prefix is kept
    later_queries = ["a query never seen", "another new one"]
    later_documents = [DOCUMENTS[0], DOCUMENTS[1]]  # one pair per document: shared with nothing in this call
    padded_teacher.stats = {}
    cached = padded_teacher.score(later_queries, later_documents)
    prompts = padded_teacher.prompts.pair_prompts(later_queries, later_documents)
    assert padded_teacher.stats["tokens"] == sum(
        len(ids) - shared for ids, shared in zip(prompts.input_ids, prompts.shared_tokens)
    )
    fresh = GenerativeReranker(
        padded_teacher.model, padded_teacher.tokenizer, TINY_PROMPT, prefix_cache_mb=0
    ).score(later_queries, later_documents)
    torch.testing.assert_close(cached.score, fresh.score, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cached.hidden, fresh.hidden, atol=1e-4, rtol=1e-4)


def test_prefix_cache_keeps_the_most_recent_within_its_bytes():
    cache = PrefixCache(max_bytes=3 * 400)  # three float32 tensors of 100 values
    for key in range(4):
        cache[(key,)] = torch.zeros(100)
    assert list(cache) == [(1,), (2,), (3,)] and cache.bytes == 1200
    cache[(1,)]  # read: now the most recent
    cache[(4,)] = torch.zeros(100)
    assert list(cache) == [(3,), (1,), (4,)]
    cache[(5,)] = torch.zeros(400)  # bigger than the whole budget: not kept, nothing evicted for it
    assert (5,) not in cache and len(cache) == 3
    empty = PrefixCache(0)
    empty[(1,)] = torch.zeros(1)
    assert len(empty) == 0 and empty.bytes == 0


def test_rerank_regroups_document_major_scores_by_query(tiny_teacher):
    candidates = [DOCUMENTS[:2], [], DOCUMENTS[1:], DOCUMENTS[3:]]
    scores = tiny_teacher.rerank(QUERIES, candidates)
    assert [s.shape for s in scores] == [(len(docs),) for docs in candidates]
    for query, docs, row in zip(QUERIES, candidates, scores):
        if docs:
            torch.testing.assert_close(
                row, tiny_teacher.score([query] * len(docs), docs).score, atol=1e-5, rtol=1e-5
            )
    assert tiny_teacher.rerank([], []) == []
    # With details, each query's TeacherScores: every field as `score` gives it (one tokenisation for both).
    cut_teacher = GenerativeReranker(
        tiny_teacher.model, tiny_teacher.tokenizer, PromptConfig(max_doc_tokens=3, max_query_tokens=4)
    )
    details = cut_teacher.rerank(QUERIES, candidates, details=True)
    for query, docs, row in zip(QUERIES, candidates, details):
        plain = cut_teacher.score([query] * len(docs), docs)
        for field in dataclasses.fields(plain):
            torch.testing.assert_close(getattr(row, field.name), getattr(plain, field.name), atol=1e-5, rtol=1e-5)
    assert details[0].doc_truncated.any() and details[0].query_truncated.all()
    empty = tiny_teacher.rerank(["q"], [[]], details=True)[0]
    assert empty.score.shape == (0,) and empty.hidden.shape == (0, tiny_teacher.hidden_size)
