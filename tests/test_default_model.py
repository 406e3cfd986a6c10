"""Integration tests on the real default model, SmolLM2-135M-Instruct (converted once, then read from cache)."""

import pytest
import torch

from rabtriever_ray.config import TeacherConfig, load_config
from rabtriever_ray.models import cache_dir
from rabtriever_ray.student import Rabtriever
from rabtriever_ray.teacher import GenerativeReranker

# Slow: the real 135M model, converted to safetensors on first use.
pytestmark = [pytest.mark.default_model, pytest.mark.slow]

CONVERSATION = (
    "Seeker: I have been feeling so lonely since I moved to a new city.\n"
    "Supporter: Moving can be really isolating.\n"
    "Seeker: Yes, I don't know anyone here and work is remote."
)
STRATEGIES = [
    "Question: ask for information related to the problem to help the seeker articulate the issues they face.",
    "Providing Suggestions: provide suggestions about how to change, but be careful not to overstep.",
]


@pytest.fixture(scope="module")
def teacher(default_model):
    model, tokenizer = default_model
    config = load_config(TeacherConfig, "configs/teacher/esconv_strategy.yaml")
    return GenerativeReranker(model, tokenizer, config.prompt)


def test_default_model_is_cached_as_safetensors(default_model):
    model, tokenizer = default_model
    cached = cache_dir() / "smollm2-135m-instruct"
    assert list(cached.glob("*.safetensors")) and (cached / "config.json").is_file()
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert tokenizer.chat_template


def test_default_teacher_scores_pairs(teacher):
    assert teacher.tokenizer.decode([teacher.prompts.yes_id]) == "yes"
    assert teacher.tokenizer.decode([teacher.prompts.no_id]) == "no"
    out = teacher.score([CONVERSATION] * 2, STRATEGIES)
    assert out.hidden.shape == (2, 576)
    for name in ("score", "logp_yes", "logp_no", "hidden"):
        assert torch.isfinite(getattr(out, name)).all(), name
    torch.testing.assert_close(out.score, out.logp_yes - out.logp_no, atol=1e-4, rtol=1e-4)
    # The instruct model puts real mass on the answer words at the answer position.
    assert (torch.logaddexp(out.logp_yes, out.logp_no) > -5).all()
    with torch.no_grad():
        ids = teacher.prompts.pair_prompts([CONVERSATION], STRATEGIES[:1]).input_ids[0]
        logits = teacher.model(torch.tensor([ids])).logits[0, -1]
    torch.testing.assert_close(teacher.head.logits(out.hidden[0]), logits, atol=1e-3, rtol=1e-4)


def test_default_student_matches_teacher_on_empty_document(teacher):
    student = Rabtriever(teacher)
    h_q = student.encode_queries([CONVERSATION])
    h_d = student.encode_documents(STRATEGIES)
    assert h_d.shape == (2, 576)
    expected = teacher.score([CONVERSATION], [""]).score
    torch.testing.assert_close(student.score_matrix(h_q, h_d), expected.expand(1, 2), atol=1e-4, rtol=1e-4)


def test_a_lone_default_query_runs_only_its_own_tokens_and_after(default_model):
    """SmolLM2's tokenizer merges the newlines around the empty document slot into one token; the query prompt
    still holds no document, so once cached everything before the query is reused, exactly."""
    model, tokenizer = default_model
    prompt = load_config(TeacherConfig, "configs/teacher/esconv_strategy.yaml").prompt
    teacher = GenerativeReranker(model, tokenizer, prompt)
    plain = GenerativeReranker(model, tokenizer, prompt, share_prefix=False)
    first, second = (teacher.prompts.query_prompts([text]) for text in (CONVERSATION, STRATEGIES[0]))
    assert first.doc_tokens == second.doc_tokens == [0]
    cached = [teacher.encode(first)]
    ran = teacher.stats["tokens"]
    cached.append(teacher.encode(second))
    assert teacher.stats["tokens"] - ran == len(second.input_ids[0]) - second.shared_tokens[0]
    reference = plain.encode(teacher.prompts.query_prompts([CONVERSATION, STRATEGIES[0]]))
    torch.testing.assert_close(torch.cat(cached), reference, atol=1e-4, rtol=1e-4)
