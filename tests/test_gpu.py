"""GPU paths: bf16 by default on CUDA, teacher and student on the device. Skipped without a GPU."""

import pytest
import torch
from conftest import DOCUMENTS, QUERIES

from rabtriever_ray.config import PromptConfig
from rabtriever_ray.models import load_causal_lm
from rabtriever_ray.student import Rabtriever
from rabtriever_ray.teacher import GenerativeReranker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_defaults_to_bf16_and_matches_fp32():
    model, tokenizer = load_causal_lm("tiny-random-llama")
    assert next(model.parameters()).device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16
    teacher = GenerativeReranker(model, tokenizer, PromptConfig(max_doc_tokens=48, max_query_tokens=32))
    bf16 = teacher.score(QUERIES, DOCUMENTS)
    ref_model, _ = load_causal_lm("tiny-random-llama", device="cpu")
    ref = GenerativeReranker(ref_model, tokenizer, teacher.prompts.config).score(QUERIES, DOCUMENTS)
    assert bf16.hidden.dtype == torch.float32 and bf16.hidden.device.type == "cpu"
    torch.testing.assert_close(bf16.hidden, ref.hidden, atol=0.05, rtol=0.05)
    torch.testing.assert_close(bf16.score, ref.score, atol=0.05, rtol=0.05)

    single = [teacher.score([q], [d]).score[0] for q, d in zip(QUERIES, DOCUMENTS)]
    torch.testing.assert_close(torch.stack(single), bf16.score, atol=0.02, rtol=0.02)

    student = Rabtriever(teacher)
    assert student.q_proj.weight.device.type == "cuda"
    h_q = student.encode_queries(QUERIES)
    h_d = student.encode_documents(DOCUMENTS)
    matrix = student.score_matrix(h_q, h_d)
    assert matrix.device.type == "cuda" and torch.isfinite(matrix).all()
    empty = teacher.score(QUERIES, [""] * len(QUERIES)).score
    torch.testing.assert_close(matrix[:, 0].cpu(), empty, atol=0.02, rtol=0.02)
    loss = student.score(h_q, h_d).sum()
    loss.backward()
    assert student.predictor.fc_out.weight.grad is not None


def test_cuda_shared_prefix_matches_plain_batching():
    model, tokenizer = load_causal_lm("tiny-random-llama", dtype=torch.float32)
    teacher = GenerativeReranker(model, tokenizer, PromptConfig(max_doc_tokens=48, max_query_tokens=32))
    queries, documents = QUERIES * 2, [DOCUMENTS[0]] * 4 + DOCUMENTS
    shared = teacher.score(queries, documents)
    teacher.share_prefix = False
    plain = teacher.score(queries, documents)
    torch.testing.assert_close(shared.hidden, plain.hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared.score, plain.score, atol=1e-4, rtol=1e-4)
