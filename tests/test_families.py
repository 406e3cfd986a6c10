"""Every supported decoder family scores exactly: tiny seeded random configs of each (tests/tiny_families.py).

Per family: the head reproduces the model's own logits (after its post-processing), prompts are the chat
template's own tokenisation, shared-prefix scores equal plain batching on documents longer than the sliding
window, batched equals one pair at a time, the untrained student equals the teacher on an empty document, and one
distillation step and one index + search round trip run.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tiny_families import (
    FAMILIES,
    POSTPROCESSED,
    SENTENCEPIECE_STYLES,
    SLIDING,
    WINDOW,
    build_family,
    build_tokenizer,
)

from rabtriever_ray import families
from rabtriever_ray.config import LossConfig, PromptConfig, StudentConfig, TeacherConfig
from rabtriever_ray.families import SUPPORTED, UnsupportedModelError, final_norm, sliding_window
from rabtriever_ray.prompts import PromptBuilder, PromptError
from rabtriever_ray.scoring import YesNoHead, check_output_head
from rabtriever_ray.student import Rabtriever
from rabtriever_ray.teacher import GenerativeReranker

PROMPT = PromptConfig(max_doc_tokens=64, max_query_tokens=32)
QUERIES = [
    "Seeker: my friend stopped talking to me.\nSupporter: how long has it been?",
    "  pick up the cup please",
    "is the claim supported",
]
# Longer than the sliding window (8 tokens) on their own; the first ends in a newline.
DOCUMENTS = [
    "Reflection of feelings: articulate and describe the seeker's feelings about what happened.\n",
    "Pick up the cup: grasp a cup by its handle and lift it from the table, then hold it steady.",
    "The abstract supports the claim that the protein binds to the receptor in most cells.",
]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model, tokenizer = build_family(request.param)
    return request.param, model, tokenizer, GenerativeReranker(model, tokenizer, PROMPT)


def _pairs():
    """Every query with every document: each document is shared by three pairs."""
    return [q for q in QUERIES for _ in DOCUMENTS], [d for _ in QUERIES for d in DOCUMENTS]


def test_the_matrix_covers_every_supported_model_type():
    assert set(FAMILIES) == set(SUPPORTED)


def test_head_reproduces_the_models_own_logits(family):
    name, model, tokenizer, teacher = family
    prompts = teacher.prompts.pair_prompts(QUERIES[:1], DOCUMENTS[:1])
    hidden = teacher.encode(prompts)
    with torch.no_grad():
        own = model(input_ids=torch.tensor(prompts.input_ids), use_cache=False).logits[0, -1].float()
    torch.testing.assert_close(teacher.head.logits(hidden[0]), own, atol=1e-5, rtol=1e-4)
    score, logp_yes, logp_no = teacher.head.log_probs(hidden)
    logp = torch.log_softmax(own, -1)
    torch.testing.assert_close(logp_yes[0], logp[teacher.prompts.yes_id], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(score[0], logp_yes[0] - logp_no[0], atol=1e-5, rtol=1e-4)
    raw = model.get_output_embeddings()(final_norm(model)(hidden[0]))
    if name in POSTPROCESSED:  # without the family's post-processing the distribution would be another one
        assert (raw - own).abs().max() > 1e-2
    else:
        torch.testing.assert_close(raw, own, atol=1e-5, rtol=1e-4)
    assert check_output_head(model) < 1e-4


def test_prompts_are_the_chat_templates_own_tokenisation(family):
    name, _, tokenizer, teacher = family
    config = teacher.prompts.config
    query, document = QUERIES[1], DOCUMENTS[0]  # spaces before the query, a newline after the document
    assert config.instruction_first  # the default: the instruction opens the message
    user = f"{config.task_instruction} {config.answer_hint}\n\nDocument:\n{document}\n\nQuery:\n{query}"
    if tokenizer.chat_template:
        expected = tokenizer.apply_chat_template(
            [{"role": "user", "content": user}],
            tokenize=True,
            add_generation_prompt=True,
            enable_thinking=False,
        )
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    else:
        expected = tokenizer(f"{tokenizer.bos_token}{user}\nAnswer:", add_special_tokens=False).input_ids
    encoded = teacher.prompts.pair_prompts([query], [document])
    assert encoded.input_ids[0] == list(expected)
    assert encoded.truncated == [False]
    if FAMILIES[name] in SENTENCEPIECE_STYLES:
        # Tokenised segment by segment, every segment would start with a stray "▁".
        head, rest = tokenizer.apply_chat_template(
            [{"role": "user", "content": user.replace(document, "\0")}],
            tokenize=False,
            add_generation_prompt=True,
        ).split("\0")
        spliced = [tokenizer(t, add_special_tokens=False).input_ids for t in (head, document, rest)]
        assert sum(spliced, []) != encoded.input_ids[0]


def test_truncation_is_exact_in_the_prompt(family):
    """Documents keep exactly their first max_doc_tokens tokens and queries their last max_query_tokens, counted
    where they sit in the prompt, whatever the tokenizer merges at their edges."""
    _, _, tokenizer, _ = family
    builder = PromptBuilder(tokenizer, PromptConfig(max_doc_tokens=6, max_query_tokens=5))
    cut = builder.pair_prompts(QUERIES, DOCUMENTS)
    assert cut.doc_tokens == [6] * 3 and cut.query_tokens == [5] * 3 and all(cut.truncated)
    text = tokenizer.decode(cut.input_ids[0])
    assert "Reflection" in text and "happened" not in text  # the document's start survives, its end does not
    assert "been?" in text and "stopped" not in text  # the query's latest words survive


@pytest.mark.parametrize("instruction_first", [True, False])
def test_shared_prefix_equals_plain_batching_beyond_the_window(family, instruction_first):
    """Instruction first, a pair's own tokens are few (with some templates no more than the window, which then
    reaches back into the shared prefix); instruction last, every pair's own tokens are longer than the window."""
    name, model, tokenizer, _ = family
    prompt = dataclasses.replace(PROMPT, instruction_first=instruction_first)
    teacher = GenerativeReranker(model, tokenizer, prompt)
    plain = GenerativeReranker(model, tokenizer, prompt, share_prefix=False)
    queries, documents = _pairs()
    prompts = teacher.prompts.pair_prompts(queries, documents)
    if name in SLIDING:
        assert sliding_window(model) == WINDOW
        own = [p - s for p, s in zip(map(len, prompts.input_ids), prompts.shared_tokens)]
        assert instruction_first or min(own) > WINDOW
        assert min(prompts.doc_tokens) > WINDOW
    shared, reference = teacher.score(queries, documents), plain.score(queries, documents)
    if name in SLIDING:  # the window shapes these prompts: without it the states differ
        config = model.config.get_text_config()
        window, config.sliding_window = config.sliding_window, 4096
        try:
            unwindowed = plain.score(queries, documents).hidden
        finally:
            config.sliding_window = window
        assert (unwindowed - reference.hidden).abs().max() > 1e-3
    torch.testing.assert_close(shared.hidden, reference.hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared.score, reference.score, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared.logp_yes, reference.logp_yes, atol=1e-4, rtol=1e-4)
    # The query tokens' mean state (a student query embedding's second half) from the tails of shared prefixes.
    torch.testing.assert_close(
        teacher.encode(prompts, query_mean=True), plain.encode(prompts, query_mean=True), atol=1e-4, rtol=1e-4
    )


def test_a_query_runs_only_its_own_tokens_once_the_template_is_cached(family):
    """Serving encodes one query at a time: everything before the query comes from the teacher's prefix cache,
    exactly."""
    _, model, tokenizer, _ = family
    teacher = GenerativeReranker(model, tokenizer, PROMPT)  # an empty cache
    plain = GenerativeReranker(model, tokenizer, PROMPT, share_prefix=False)
    for query_mean in (False, True):  # the answer-position state, and with the query tokens' mean after it
        one_by_one = torch.cat(
            [teacher.encode(teacher.prompts.query_prompts([q]), query_mean=query_mean) for q in QUERIES]
        )
        reference = plain.encode(plain.prompts.query_prompts(QUERIES), query_mean=query_mean)
        torch.testing.assert_close(one_by_one, reference, atol=1e-4, rtol=1e-4)
    prompts = teacher.prompts.query_prompts(QUERIES[:1])
    assert tuple(prompts.input_ids[0][: prompts.shared_tokens[0]]) in teacher.prefix_cache
    ran = teacher.stats["tokens"]
    teacher.encode(prompts)
    assert teacher.stats["tokens"] - ran == len(prompts.input_ids[0]) - prompts.shared_tokens[0]
    # A lone teacher pair reuses the cached template before its document.
    torch.testing.assert_close(
        teacher.score(QUERIES[:1], DOCUMENTS[:1]).score,
        plain.score(QUERIES[:1], DOCUMENTS[:1]).score,
        atol=1e-4,
        rtol=1e-4,
    )


def test_batched_scores_equal_one_pair_at_a_time(family):
    _, _, _, teacher = family
    queries, documents = _pairs()
    batched = teacher.score(queries, documents).score
    single = torch.cat([teacher.score([q], [d]).score for q, d in zip(queries, documents)])
    torch.testing.assert_close(batched, single, atol=1e-4, rtol=1e-4)


def test_untrained_student_equals_the_teacher_on_an_empty_document(family):
    _, _, _, teacher = family
    student = Rabtriever(teacher, StudentConfig(predictor_hidden=16, proj_dim=8))
    expected = teacher.score(QUERIES, [""] * len(QUERIES))
    h_query, h_doc = student.encode_queries(QUERIES), student.encode_documents(DOCUMENTS)
    torch.testing.assert_close(h_query[:, : student.hidden_size], expected.hidden, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student.score(h_query, h_doc), expected.score, atol=1e-5, rtol=1e-5)


def test_one_distillation_step_and_an_index_search_round_trip(family):
    from rabtriever_ray.distill_loop import distill_losses
    from rabtriever_ray.index import DocumentIndex, encode_corpus
    from rabtriever_ray.search import Searcher

    name, _, _, teacher = family
    student = Rabtriever(teacher, StudentConfig(predictor_hidden=16, proj_dim=8))
    queries, documents = _pairs()
    target = teacher.score(queries, documents)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    before = student.predictor.fc_out.weight.detach().clone()
    terms = distill_losses(
        student,
        student,
        student.encode_queries(queries),
        student.encode_documents(documents),
        target.hidden,
        target.score,
        queries,
        LossConfig(),
    )
    assert all(torch.isfinite(v) for v in terms.values()) and terms["total"] > 0
    terms["total"].backward()
    optimizer.step()
    assert not torch.equal(student.predictor.fc_out.weight, before)

    student.eval()
    index = DocumentIndex.from_table(encode_corpus(student, ["a", "b", "c"], DOCUMENTS))
    config = TeacherConfig(model=name, prompt=PROMPT)
    hits = Searcher.from_student(student, config, index).search(QUERIES, top_k=3)
    with torch.no_grad():
        matrix = student.score_matrix(student.encode_queries(QUERIES), student.encode_documents(DOCUMENTS))
    for row, query_hits in zip(matrix, hits):
        assert [h.doc_id for h in query_hits] == [["a", "b", "c"][j] for j in row.argsort(descending=True)]
        torch.testing.assert_close(
            torch.tensor([h.score for h in query_hits]), row.sort(descending=True).values
        )


# -- the head in float32 --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_a_bf16_backbone_scores_in_float32(name, monkeypatch):
    model, tokenizer = build_family(name)
    model = model.to(torch.bfloat16)
    head = YesNoHead(model, 5, 7)
    hidden = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 3
    nudged = hidden + 1e-3 * torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    norm = final_norm(model)
    weight = model.get_output_embeddings().weight.float()
    reference_norm = {k: v.float() for k, v in norm.named_parameters()}
    normed = torch.func.functional_call(norm, reference_norm, (hidden,))
    reference = families.logit_transform(model)(normed @ weight.T)
    torch.testing.assert_close(head.logits(hidden), reference, atol=1e-5, rtol=1e-5)
    assert head.score(hidden).dtype == torch.float32
    torch.testing.assert_close(head.score(hidden), reference[:, 5] - reference[:, 7], atol=1e-5, rtol=1e-5)
    # Small differences of the input survive: in bf16 they round away into ties.
    assert (head.score(hidden) != head.score(nudged)).all()
    with torch.no_grad():
        rounded = model.get_output_embeddings()(norm(hidden.bfloat16()))
        rounded_nudged = model.get_output_embeddings()(norm(nudged.bfloat16()))
    assert (rounded[:, 5] - rounded[:, 7] == rounded_nudged[:, 5] - rounded_nudged[:, 7]).any()
    # The full-vocabulary logits come out in float32 chunks equal to one float32 product.
    monkeypatch.setattr("rabtriever_ray.scoring.VOCAB_CHUNK", 100)
    torch.testing.assert_close(head.logits(hidden), reference, atol=1e-5, rtol=1e-5)


# -- refusals ---------------------------------------------------------------------------------------------------


def test_an_unsupported_model_type_is_refused_at_load_naming_it(tmp_path):
    from transformers import OlmoConfig, OlmoForCausalLM

    from rabtriever_ray.models import load_causal_lm

    tokenizer = build_tokenizer("chatml")
    config = OlmoConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    OlmoForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    with pytest.raises(
        UnsupportedModelError, match=r"model type 'olmo' \(OlmoForCausalLM\) is not supported.*gemma2"
    ):
        load_causal_lm(str(tmp_path), device="cpu")


def test_a_head_that_misses_the_familys_post_processing_is_caught(monkeypatch):
    model, _ = build_family("gemma2")
    monkeypatch.setattr("rabtriever_ray.scoring.logit_transform", lambda _: families.LogitTransform())
    with pytest.raises(UnsupportedModelError, match="'gemma2'.*does not reproduce the model's own logits"):
        check_output_head(model)


def test_prefix_sharing_is_off_for_layers_without_a_plain_cache(caplog):
    model, tokenizer = build_family("qwen2")
    model.config.layer_types = ["linear_attention", "full_attention"]  # as a hybrid model declares its layers
    with caplog.at_level("INFO", logger="rabtriever_ray.teacher"):
        teacher = GenerativeReranker(model, tokenizer, PROMPT)
    assert not teacher.share_prefix
    assert "prefix sharing is off" in caplog.text and "linear_attention" in caplog.text


# -- thinking templates -----------------------------------------------------------------------------------------


def test_qwen3_thinking_is_off_by_default_and_can_be_turned_on():
    tokenizer = build_tokenizer("qwen3")
    off = PromptBuilder(tokenizer, PROMPT)
    text = tokenizer.decode(off.pair_prompts(["q"], ["d"]).input_ids[0])
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    on = PromptBuilder(tokenizer, PromptConfig(enable_thinking=True))
    assert tokenizer.decode(on.pair_prompts(["q"], ["d"]).input_ids[0]).endswith("<|im_start|>assistant\n")


def test_a_template_that_opens_a_thinking_block_needs_an_answer_prefix():
    tokenizer = build_tokenizer("think_open")
    with pytest.raises(PromptError, match="opens a thinking block.*prompt.answer_prefix"):
        PromptBuilder(tokenizer, PROMPT)
    closed = PromptBuilder(tokenizer, PromptConfig(answer_prefix="</think>\n\n"))
    text = tokenizer.decode(closed.pair_prompts(["q"], ["d"]).input_ids[0])
    assert text.endswith("<think>\n</think>\n\n") and tokenizer.decode([closed.yes_id]) == "yes"


# -- jobs/score_teacher.py with a saved model of each family ----------------------------------------------------


@pytest.mark.parametrize("name", list(FAMILIES))
def test_a_saved_model_of_each_family_loads_and_scores_as_it_was(name, tmp_path):
    """The folder a user hands over as ``--model``: saved, loaded back by spec, the same scores."""
    model, tokenizer = build_family(name)
    model_dir = tmp_path / name
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    config = PromptConfig(max_doc_tokens=32)
    loaded = GenerativeReranker.from_config(TeacherConfig(model=str(model_dir), prompt=config), device="cpu")
    expected = GenerativeReranker(model, tokenizer, config).score(QUERIES, DOCUMENTS)
    torch.testing.assert_close(loaded.score(QUERIES, DOCUMENTS).score, expected.score, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # jobs/score_teacher.py on Ray Data: a byte-level BPE and a SentencePiece-style family
@pytest.mark.parametrize("name", ["qwen3", "mistral"])
def test_score_teacher_job_with_a_saved_model(name, ray_local, tmp_path):
    """Teacher actors load a saved model folder and score exactly what the in-process teacher gives (that every
    family's folder loads and scores as it was is the test above)."""
    import pyarrow.parquet as pq
    from helpers import SKILLS, write_beir
    from score_teacher import main

    model, tokenizer = build_family(name)
    model_dir = tmp_path / name
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    beir = write_beir(tmp_path / "skills")
    out = tmp_path / "scores"
    manifest = main(
        ["--data", str(beir), "--split", "test", "--out", str(out), "--model", str(model_dir)]
        + ["--cpus-per-actor", "0.5", "--max-queries", "2", "teacher.prompt.max_doc_tokens=32"]
    )
    assert manifest["rows"] == 2 * len(SKILLS) and manifest["hidden_size"] == 64
    table = pq.read_table(out / "data").sort_by([("query_id", "ascending"), ("doc_id", "ascending")])
    teacher = GenerativeReranker(model, tokenizer, PromptConfig(max_doc_tokens=32))
    expected = teacher.score(table.column("query_text").to_pylist(), table.column("doc_text").to_pylist())
    torch.testing.assert_close(
        torch.tensor(table.column("teacher_score").to_numpy()), expected.score, atol=1e-4, rtol=1e-4
    )
