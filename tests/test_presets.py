"""Reranker presets: each renders the token ids its model's reference code builds and scores by its formula.

The references below are written from the published code, independently of `rabtriever_ray.presets`:
Qwen3-Reranker's model card (``format_instruction`` / ``process_inputs`` / ``compute_logits``), FlagEmbedding's
``BaseLLMReranker.compute_score_single_gpu`` (bge-reranker-v2-gemma) and mixedbread's
``MxbaiRerankV2.prepare_inputs`` / ``forward``. Tiny random models and locally built tokenizers; no downloads.
"""

from __future__ import annotations

import pytest
import torch
from tiny_families import build_family

from rabtriever_ray.config import ConfigError, LossConfig, PromptConfig, StudentConfig
from rabtriever_ray.distill_loop import distill_losses
from rabtriever_ray.models import build_tiny_random_llama
from rabtriever_ray.prompts import PromptBuilder
from rabtriever_ray.student import Rabtriever
from rabtriever_ray.teacher import GenerativeReranker

QWEN3_PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
QWEN3_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
QWEN3_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
BGE_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by providing "
    "a prediction of either 'Yes' or 'No'."
)
MXBAI_PREFIX = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
)
MXBAI_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
MXBAI_TASK = (
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)

QUERIES = ["wipe the table", "Seeker: my friend stopped talking to me.", "café ünïcode ✓ query", "open it"]
DOCUMENTS = ["pick up the cup", "", "Affirmation and Reassurance: ça va ✓", "open the drawer\nthen close it"]


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def qwen3_reference(tokenizer, query: str, document: str, instruction: str | None = None) -> list:
    """The model card's process_inputs: prefix, formatted pair and suffix tokenised one by one."""
    pair = f"<Instruct>: {instruction or QWEN3_INSTRUCTION}\n<Query>: {query}\n<Document>: {document}"
    return [QWEN3_PREFIX, pair, QWEN3_SUFFIX]


def bge_reference(tokenizer, query: str, document: str, instruction: str | None = None) -> list:
    """FlagEmbedding: [BOS] + 'A: {query}', sep + 'B: {passage}', then sep + prompt, each tokenised alone."""
    bos = tokenizer.bos_token_id
    head = [bos] if bos is not None and bos != tokenizer.pad_token_id else []
    return head + [f"A: {query}", "\n", f"B: {document}", "\n", instruction or BGE_PROMPT]


def mxbai_reference(tokenizer, query: str, document: str, instruction: str | None = None) -> list:
    """MxbaiRerankV2.prepare_inputs + concat_input_ids."""
    query_prompt = f"query: {query}"
    if instruction:
        query_prompt = f"instruction: {instruction}\n{query_prompt}"
    return [MXBAI_PREFIX, query_prompt, "\n", f"document: {document}", "\n", MXBAI_TASK, MXBAI_SUFFIX]


def reference_ids(tokenizer, parts: list) -> list[int]:
    return [i for part in parts for i in ([part] if isinstance(part, int) else _ids(tokenizer, part))]


def reference_text(parts: list) -> str:
    return "".join(part for part in parts if isinstance(part, str))


def qwen3_score(logits, tokenizer):
    """The model card's ``compute_logits``: softmax over (no, yes) at the last position, P(yes)."""
    pair = torch.stack([logits[tokenizer.convert_tokens_to_ids("no")], logits[_ids(tokenizer, "yes")[0]]])
    return pair.log_softmax(0)[1].exp()


def bge_score(logits, tokenizer):
    return logits[_ids(tokenizer, "Yes")[0]]  # FlagEmbedding: scores[:, yes_loc], raw


def mxbai_score(logits, tokenizer):
    return logits[_ids(tokenizer, "1")[0]] - logits[_ids(tokenizer, "0")[0]]


# preset -> (reference prompt, reference score, the published score from ours, tiny model)
PRESETS = {
    "qwen3-reranker": (qwen3_reference, qwen3_score, torch.sigmoid, "chatml"),
    "bge-reranker-gemma": (bge_reference, bge_score, lambda s: s, "gemma"),
    "mxbai-rerank-v2": (mxbai_reference, mxbai_score, lambda s: s, "chatml"),
}


def _model(kind: str):
    return build_tiny_random_llama() if kind == "chatml" else build_family(kind)


@pytest.fixture(scope="module", params=list(PRESETS))
def preset(request):
    name = request.param
    model, tokenizer = _model(PRESETS[name][3])
    return name, model, tokenizer


@pytest.mark.parametrize("instruction", [None, "Pick the robot skill this instruction needs"])
def test_prompt_ids_are_the_reference_codes(preset, instruction):
    """Token ids equal the reference's (units tokenised one by one) and, decoded, the published format."""
    name, _, tokenizer = preset
    reference = PRESETS[name][0]
    prompts = PromptBuilder(tokenizer, PromptConfig(preset=name, instruction=instruction)).pair_prompts(
        QUERIES, DOCUMENTS
    )
    for row, (query, doc) in enumerate(zip(QUERIES, DOCUMENTS)):
        parts = reference(tokenizer, query, doc, instruction)
        assert prompts.input_ids[row] == reference_ids(tokenizer, parts), (name, query, doc)
        decoded = tokenizer.decode(prompts.input_ids[row], skip_special_tokens=False)
        assert decoded.removeprefix(tokenizer.bos_token or "") == reference_text(parts)
    assert prompts.doc_tokens[1] == 0 and min(prompts.query_tokens) > 0 and min(prompts.doc_tokens[2:]) > 0
    # The query comes first: pairs of one query share everything before the document.
    assert all(start < shared for start, shared in zip(prompts.query_start, prompts.shared_tokens))


def test_a_cut_document_is_the_reference_of_the_kept_text(preset):
    name, _, tokenizer = preset
    builder = PromptBuilder(tokenizer, PromptConfig(preset=name, max_doc_tokens=4, max_query_tokens=3))
    doc = "open the drawer then close it and wipe the table twice"
    query = "Seeker: my friend stopped talking to me and I do not know why"
    prompts = builder.pair_prompts([query], [doc])
    assert prompts.doc_truncated == [True] and prompts.query_truncated == [True]
    assert prompts.doc_tokens == [4] and prompts.query_tokens == [3]
    reference = PRESETS[name][0]
    # A prefix of the document and a suffix of the query give exactly these ids through the reference (found by
    # text first: the tokenizers here decode exactly).
    decoded = tokenizer.decode(prompts.input_ids[0]).removeprefix(tokenizer.bos_token or "")
    kept = [
        (q, d)
        for d in range(1, len(doc))
        for q in range(len(query))
        if reference_text(reference(tokenizer, query[q:], doc[:d])) == decoded
    ]
    assert len(kept) == 1
    parts = reference(tokenizer, query[kept[0][0] :], doc[: kept[0][1]])
    assert reference_ids(tokenizer, parts) == prompts.input_ids[0]


def test_score_is_the_reference_formula_on_the_models_own_logits(preset):
    name, model, tokenizer = preset
    reference, formula, published, _ = PRESETS[name]
    teacher = GenerativeReranker(model, tokenizer, PromptConfig(preset=name))
    ours = teacher.score(QUERIES, DOCUMENTS).score
    for row, (query, doc) in enumerate(zip(QUERIES, DOCUMENTS)):
        ids = reference_ids(tokenizer, reference(tokenizer, query, doc))
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
        assert published(ours[row]).item() == pytest.approx(formula(logits, tokenizer).item(), abs=1e-4)


def test_shared_prefixes_equal_plain_batching(preset):
    """Query first: a query's candidates share everything before the document, exactly."""
    name, model, tokenizer = preset
    config = PromptConfig(preset=name)
    queries = [q for q in QUERIES[:2] for _ in DOCUMENTS]
    documents = DOCUMENTS * 2
    shared = GenerativeReranker(model, tokenizer, config, share_prefix=True)
    plain = GenerativeReranker(model, tokenizer, config, share_prefix=False)
    a, b = shared.score(queries, documents), plain.score(queries, documents)
    torch.testing.assert_close(a.score, b.score, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=1e-5)
    if shared.share_prefix:
        assert shared.stats["tokens"] < plain.stats["tokens"]  # the query prefixes ran once per query
    # The student's query prompts (with the query tokens' mean, read from the tail) are the same either way,
    # including a query that appears twice in one call.
    repeated = [QUERIES[0], QUERIES[1], QUERIES[0]]
    with_prefix = Rabtriever(shared, StudentConfig(predictor_hidden=16, proj_dim=8)).encode_queries(repeated)
    without = Rabtriever(plain, StudentConfig(predictor_hidden=16, proj_dim=8)).encode_queries(repeated)
    torch.testing.assert_close(with_prefix, without, atol=1e-5, rtol=1e-5)


def test_untrained_student_equals_the_teacher_on_an_empty_document_and_distils(preset):
    name, model, tokenizer = preset
    teacher = GenerativeReranker(model, tokenizer, PromptConfig(preset=name))
    student = Rabtriever(teacher, StudentConfig(predictor_hidden=16, proj_dim=8))
    expected = teacher.score(QUERIES, [""] * len(QUERIES))
    h_query = student.encode_queries(QUERIES)
    h_doc = student.encode_documents(["pick up the cup", "wipe", "open", "close"])
    torch.testing.assert_close(student.score(h_query, h_doc), expected.score, atol=1e-5, rtol=1e-5)
    # One distillation step on the preset's teacher scores moves the predictor.
    scored = teacher.score(QUERIES, DOCUMENTS)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    before = [p.detach().clone() for p in student.predictor.parameters()]
    terms = distill_losses(
        student.train(),
        student,
        h_query,
        h_doc,
        scored.hidden,
        scored.score,
        ["q0", "q0", "q1", "q1"],
        LossConfig(),
    )
    assert torch.isfinite(terms["total"])
    terms["total"].backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, student.predictor.parameters()))


def test_published_presets_fix_their_template():
    with pytest.raises(ConfigError, match="prompt.doc_label shapes the rabtriever template only"):
        PromptConfig(preset="qwen3-reranker", doc_label="Passage")
    with pytest.raises(ConfigError, match="prompt.preset must be one of"):
        PromptConfig(preset="qwen3")
    assert PromptConfig(preset="qwen3-reranker").task_instruction == QWEN3_INSTRUCTION
    assert PromptConfig(preset="mxbai-rerank-v2").task_instruction is None
