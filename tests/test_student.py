from contextlib import contextmanager

import pytest
import torch
from helpers import DOCUMENTS, QUERIES

from rabtriever_ray.config import StudentConfig
from rabtriever_ray.predictor import Predictor, count_parameters
from rabtriever_ray.student import Rabtriever


@pytest.fixture(scope="module", params=[True, False], ids=["query_mean", "last_token"])
def student(tiny_teacher, request):
    config = StudentConfig(predictor_hidden=32, proj_dim=16, query_mean=request.param)
    return Rabtriever(tiny_teacher, config).eval()


def _prompt(teacher) -> dict:
    from rabtriever_ray.config import to_dict

    return to_dict(teacher.prompts.config)


def _queries(student, n: int) -> torch.Tensor:
    """Random query embeddings of the student's width."""
    return torch.randn(n, student.query_width)


@contextmanager
def _trained_predictor(student):
    """The predictor perturbed a little for the block, then restored (from a clone: ``state_dict()`` shares
    storage with the parameters perturbed in place)."""
    untrained = {name: value.clone() for name, value in student.predictor.state_dict().items()}
    try:
        with torch.no_grad():
            for p in student.predictor.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        yield
    finally:
        student.predictor.load_state_dict(untrained)


def test_backbone_and_head_are_frozen_and_shared(tiny_teacher, student):
    assert all(not p.requires_grad for p in tiny_teacher.model.parameters())
    assert student.head.lm_head.weight.data_ptr() == tiny_teacher.model.lm_head.weight.data_ptr()
    assert student.head.norm is tiny_teacher.model.model.norm
    names = set(student.state_dict())
    assert names and all(
        n.split(".")[0] in {"predictor", "q_proj", "d_proj", "first_stage_scale"} for n in names
    )
    assert all(p.requires_grad for p in student.parameters())


def test_encoders_return_pre_norm_states(student, tiny_teacher):
    h_q = student.encode_queries(QUERIES)
    h_d = student.encode_documents(DOCUMENTS)
    assert h_q.shape == (len(QUERIES), student.query_width) and h_d.shape == (len(DOCUMENTS), 64)
    ids = tiny_teacher.prompts.document_prompts(DOCUMENTS[:1]).input_ids[0]
    with torch.no_grad():
        logits = tiny_teacher.model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(student.head.logits(h_d[0]), logits, atol=1e-5, rtol=1e-5)


def test_query_mean_is_the_mean_state_over_the_querys_own_tokens(student, tiny_teacher):
    """Against one plain forward per prompt: the states at the query's tokens, found by their characters."""
    if not student.config.query_mean:
        pytest.skip("the answer-position state alone")
    from rabtriever_ray.backbone import capture_pre_norm

    queries = ["my dog is sick", "ok", "Seeker: I can't sleep.\nSupporter: That sounds stressful."]
    h_q = student.encode_queries(queries)
    prompts = tiny_teacher.prompts
    assert not any(prompts.query_prompts(queries).query_truncated)  # so the whole query is in the prompt
    for row, query in enumerate(queries):
        ids = prompts.query_prompts([query]).input_ids[0]
        text = prompts.tokenizer.decode(ids)
        start = text.index(query)
        offsets = prompts.tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True
        ).offset_mapping
        tokens = [k for k, (a, b) in enumerate(offsets) if a < start + len(query) and b > start]
        with capture_pre_norm(tiny_teacher.model) as captured, torch.no_grad():
            tiny_teacher.model(torch.tensor([ids]))
        states = captured[-1][0]
        torch.testing.assert_close(h_q[row, :64], states[-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(h_q[row, 64:], states[tokens].mean(0), atol=1e-5, rtol=1e-5)


def test_untrained_predictor_returns_the_query_embedding(student):
    h_q = _queries(student, 3)
    h_d = torch.randn(3, 64)
    assert torch.equal(student.predict(h_q, h_d), h_q[:, :64])


def test_untrained_student_with_empty_document_equals_the_teacher(student, tiny_teacher):
    """Exact consistency: the student query prompt is the teacher prompt with an empty document."""
    teacher = tiny_teacher.score(QUERIES, [""] * len(QUERIES))
    h_q = student.encode_queries(QUERIES)
    h_d = student.encode_documents(DOCUMENTS)  # ignored by the zero-initialised predictor
    torch.testing.assert_close(h_q[:, :64], teacher.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student.score(h_q, h_d), teacher.score, atol=1e-5, rtol=1e-5)


def test_score_matrix_equals_pairwise_scores_and_depends_on_the_document(student):
    with _trained_predictor(student):
        h_q = student.encode_queries(QUERIES)
        h_d = student.encode_documents(DOCUMENTS)
        matrix = student.score_matrix(h_q, h_d, max_chunk_bytes=1)  # one query row per chunk
        assert matrix.shape == (len(QUERIES), len(DOCUMENTS))
        whole = student.score_matrix(h_q, h_d)
        torch.testing.assert_close(matrix, whole, atol=1e-5, rtol=1e-5)
        for i in range(len(QUERIES)):
            for j in range(len(DOCUMENTS)):
                pair = student.score(h_q[i : i + 1], h_d[j : j + 1])
                assert matrix[i, j].item() == pytest.approx(pair.item(), abs=1e-5)
        assert matrix[0].std() > 0  # a trained predictor reads the document
    h_q = _queries(student, 3)  # restored: the zero-initialised predictor again, whatever test runs next
    assert torch.equal(student.predict(h_q, torch.randn(3, 64)), h_q[:, :64])


def test_rerank_scores_each_querys_candidates_as_the_score_matrix_does(student):
    with _trained_predictor(student):
        h_q = student.encode_queries(QUERIES)
        h_d = student.encode_documents(DOCUMENTS)
        candidates = [[2, 0], [], [3, 1, 2, 0], [1]]
        whole = student.score_matrix(h_q, h_d)
        for chunk_bytes in (1, 256 * 2**20):  # one pair per score call, and every pair in one
            scores = student.rerank(h_q, h_d, candidates, max_chunk_bytes=chunk_bytes)
            assert [s.shape for s in scores] == [(len(rows),) for rows in candidates]
            assert all(s.dtype == torch.float32 and s.device.type == "cpu" for s in scores)
            for i, rows in enumerate(candidates):
                torch.testing.assert_close(scores[i], whole[i, rows], atol=1e-5, rtol=1e-5)
        assert student.rerank(h_q[:0], h_d, []) == []


def test_scores_match_full_vocabulary_log_probs(student):
    h = torch.randn(5, 64)
    score, logp_yes, logp_no = student.head.log_probs(h)
    torch.testing.assert_close(score, logp_yes - logp_no, atol=1e-5, rtol=1e-5)


def test_first_stage_vectors_are_unit_norm_and_start_symmetric(student):
    h = torch.randn(4, 64)
    h_q = torch.cat([h, torch.randn(4, student.query_width - 64)], dim=-1)  # the query tokens' mean, if any
    q, d = student.embed_queries(h_q), student.embed_documents(h)
    assert q.shape == (4, 16)
    torch.testing.assert_close(q.norm(dim=-1), torch.ones(4))
    torch.testing.assert_close(q, d)  # same initial map for queries and documents
    torch.testing.assert_close((q @ d.T).diagonal(), torch.ones(4))


def test_gradients_reach_only_the_trainable_parts(student):
    h_q, h_d = student.encode_queries(QUERIES[:2]), student.encode_documents(DOCUMENTS[:2])
    student.zero_grad()
    first_stage = student.embed_queries(h_q) @ student.embed_documents(h_d).T
    (student.score(h_q, h_d).sum() + first_stage.sum()).backward()
    assert student.predictor.fc_out.weight.grad is not None and student.q_proj.weight.grad is not None
    assert all(p.grad is None for p in student.teacher.model.parameters())
    student.zero_grad()


def test_predictor_parameter_count_formula():
    d, hidden = 576, 1024
    expected = 2 * 2 * d + (3 * d * hidden + hidden) + (hidden * d + d)
    assert count_parameters(Predictor(d, hidden)) == expected
    assert count_parameters(Predictor(d, hidden, input_norm=False)) == expected - 4 * d
    # The query tokens' mean is standardised by running statistics (buffers), not a LayerNorm.
    assert count_parameters(Predictor(d, hidden, query_mean=True)) == expected - 2 * d


def test_running_standardisation_merges_batches_into_the_statistics_of_all_rows():
    from rabtriever_ray.predictor import RunningStandardize

    torch.manual_seed(0)
    data = torch.randn(300, 5) * torch.tensor([1.0, 10.0, 0.1, 1000.0, 3.0]) + 7.0
    norm = RunningStandardize(5)
    assert torch.equal(norm(data), data) and norm.count.item() == 0  # nothing seen: the identity
    for chunk in data.split(70):  # uneven batches merge to the statistics of all rows
        norm.update(chunk)
    torch.testing.assert_close(norm.mean.float(), data.mean(0))
    torch.testing.assert_close(
        (norm.m2 / norm.count).float(), data.var(0, unbiased=False), rtol=1e-4, atol=1e-6
    )
    out = norm(data)
    torch.testing.assert_close(out.mean(0), torch.zeros(5), atol=1e-4, rtol=0)
    variance = data.var(0, unbiased=False)
    expected = (variance / (variance + norm.eps)).sqrt()  # eps keeps a near-constant dimension from exploding
    torch.testing.assert_close(out.std(0, unbiased=False), expected, atol=1e-4, rtol=0)
    assert norm.count.item() == 300  # applying it does not update it


def test_a_checkpoint_from_segment_tokenised_prompts_is_flagged(student, tmp_path, caplog):
    from rabtriever_ray.config import PromptConfig, to_dict
    from rabtriever_ray.student import load_student_info

    prompt = to_dict(PromptConfig())
    student.save_trainable(tmp_path / "new", teacher="tiny-random-llama", prompt=prompt)
    old = {k: v for k, v in prompt.items() if k not in ("enable_thinking", "answer_prefix", "instruction_first")}
    student.save_trainable(tmp_path / "old", teacher="tiny-random-llama", prompt=old)
    with caplog.at_level("WARNING", logger="rabtriever_ray.student"):
        load_student_info(tmp_path / "new")
        assert "tokenised segment by segment" not in caplog.text
        info = load_student_info(tmp_path / "old")
    assert "tokenised segment by segment" in caplog.text and str(tmp_path / "old") in caplog.text
    # The missing fields read as what prompts were then: their defaults, the instruction closing the message.
    assert info["teacher_config"].prompt == PromptConfig(instruction_first=False)
    assert load_student_info(tmp_path / "new")["teacher_config"].prompt == PromptConfig()


def test_only_the_training_forward_updates_the_query_statistics_and_checkpoints_keep_them(
    tiny_teacher, tmp_path
):
    from rabtriever_ray.student import load_student

    student = Rabtriever(tiny_teacher, StudentConfig(predictor_hidden=32, proj_dim=16))  # training mode
    stats = student.predictor.norm_query
    h_q, h_d = student.encode_queries(QUERIES), student.encode_documents(DOCUMENTS)
    with torch.no_grad():
        student.score(h_q, h_d)
        student.embed_queries(h_q)
    assert stats.count.item() == 0
    student(h_q, h_d)
    assert stats.count.item() == len(QUERIES)
    torch.testing.assert_close(stats.mean.float(), h_q[:, 64:].mean(0))
    student.eval()
    student(h_q, h_d)
    assert stats.count.item() == len(QUERIES)

    student.save_trainable(tmp_path, teacher="tiny-random-llama", prompt=_prompt(tiny_teacher))
    loaded = load_student(tmp_path)
    assert loaded.config.query_mean and torch.equal(loaded.predictor.norm_query.m2, stats.m2)
    with torch.no_grad():
        torch.testing.assert_close(loaded.score(h_q, h_d), student.score(h_q, h_d))


def test_a_checkpoint_from_before_query_means_loads_with_the_answer_position_state_alone(
    tiny_teacher, tmp_path
):
    import json

    from rabtriever_ray.student import load_student

    old = Rabtriever(tiny_teacher, StudentConfig(predictor_hidden=32, proj_dim=16, query_mean=False))
    old.save_trainable(tmp_path, teacher="tiny-random-llama", prompt=_prompt(tiny_teacher))
    info = json.loads((tmp_path / "student.json").read_text())
    del info["student"]["query_mean"]  # what such a checkpoint records
    (tmp_path / "student.json").write_text(json.dumps(info))
    loaded = load_student(tmp_path)
    assert not loaded.config.query_mean and loaded.encode_queries(QUERIES[:1]).shape == (1, 64)


def test_predictor_dropout_acts_in_training_only_and_validation_runs_without_it(tiny_teacher):
    from rabtriever_ray.distill_loop import validate

    student = Rabtriever(tiny_teacher, StudentConfig(predictor_hidden=32, proj_dim=16, dropout=0.5))
    with torch.no_grad():
        student.predictor.fc_out.weight.normal_()  # a predictor whose hidden layer matters
    q, d = student.encode_queries(QUERIES[:2]), student.encode_documents(DOCUMENTS[:3])
    assert student.training and not torch.equal(student.predictor(q[:1], d[:1]), student.predictor(q[:1], d[:1]))
    student.eval()
    expected = student.score(q[:1].expand(3, -1), d).tolist()
    student.train()

    val = {
        "query_id": ["q"] * 3,
        "doc_id": ["a", "b", "c"],
        "query_text": [QUERIES[0]] * 3,
        "doc_text": DOCUMENTS[:3],
        "teacher_score": [1.0, 0.0, -1.0],
        "qrels": {"q": {"a": 1}},
    }
    ranked = sorted(zip(expected, "abc"), reverse=True)[0][1]
    metrics = validate(student, val, student.encode_queries, student.encode_documents)
    assert metrics["val/R@1"] == float(ranked == "a") and student.training  # scored without dropout, mode kept
    with pytest.raises(Exception, match=r"student.dropout must be in \[0, 1\)"):
        StudentConfig(dropout=1.0)
