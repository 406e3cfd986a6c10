import dataclasses

import pytest

from rabtriever_ray.config import ConfigError, PromptConfig
from rabtriever_ray.models import build_tiny_tokenizer
from rabtriever_ray.prompts import PromptBuilder, PromptError, document_text


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def test_pair_prompt_puts_document_before_query_before_instruction(tokenizer):
    config = PromptConfig(
        instruction="Is this support strategy an appropriate next reply?", instruction_first=False
    )
    builder = PromptBuilder(tokenizer, config)
    encoded = builder.pair_prompts(["how are you"], ["the document text"])
    text = tokenizer.decode(encoded.input_ids[0])
    doc_at, query_at, instr_at = (
        text.index("the document text"),
        text.index("how are you"),
        text.index(config.task_instruction),
    )
    assert doc_at < query_at < instr_at
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    # Segment-wise tokenisation equals tokenising the rendered text in one go.
    assert encoded.input_ids[0] == tokenizer(text, add_special_tokens=False).input_ids


def test_instruction_first_opens_the_message_and_joins_the_shared_prefix(tokenizer):
    config = PromptConfig(instruction="Does the skill fit?", instruction_first=True)
    builder = PromptBuilder(tokenizer, config)
    encoded = builder.pair_prompts(["how are you", "fine thanks"], ["the document text"] * 2)
    text = tokenizer.decode(encoded.input_ids[0])
    assert text.index(config.task_instruction) < text.index("the document text") < text.index("how are you")
    assert text.endswith("how are you<|im_end|>\n<|im_start|>assistant\n")
    assert encoded.input_ids[0] == tokenizer(text, add_special_tokens=False).input_ids
    # What the pairs of one document share now holds the instruction; each pair's own tokens are its query and
    # the answer prompt.
    shared = tokenizer.decode(encoded.input_ids[0][: encoded.shared_tokens[0]])
    assert config.task_instruction in shared and shared.endswith("Query:\n")
    plain = PromptBuilder(tokenizer, PromptConfig(instruction="Does the skill fit?", instruction_first=False))
    before = plain.pair_prompts(["how are you"], ["the document text"])
    own = len(encoded.input_ids[0]) - encoded.shared_tokens[0]
    assert own < len(before.input_ids[0]) - before.shared_tokens[0]
    assert PromptBuilder.template_text(config).startswith(f"{config.task_instruction} {config.answer_hint}\n\n")
    assert builder.query_prompts(["q"]).input_ids == builder.pair_prompts(["q"], [""]).input_ids


def test_instruction_first_is_refused_for_a_published_preset():
    with pytest.raises(ConfigError, match="prompt.instruction_first shapes the rabtriever template only"):
        PromptConfig(preset="qwen3-reranker", instruction_first=False)


def test_plain_template_without_chat_template():
    tokenizer = build_tiny_tokenizer()
    tokenizer.chat_template = None
    builder = PromptBuilder(tokenizer, PromptConfig(system="Be brief."))
    text = tokenizer.decode(builder.pair_prompts(["q"], ["d"]).input_ids[0])
    assert text.startswith("Be brief.\n\nIs this document relevant to the query? Answer yes or no.\n\nDocument:\nd")
    assert text.endswith("Query:\nq\nAnswer:")


def test_template_text_is_what_the_builder_renders(tokenizer):
    """The text a teacher-scores manifest records as ``prompt_template`` is the user message of the prompt."""
    config = PromptConfig(instruction_first=False)
    template = PromptBuilder.template_text(config)
    c = config  # the manifest's text before it came from PromptBuilder: unchanged for the closing instruction
    assert (
        template
        == f"{c.doc_label}:\n{{document}}\n\n{c.query_label}:\n{{query}}\n\n{c.task_instruction} {c.answer_hint}"
    )
    rendered = tokenizer.decode(
        PromptBuilder(tokenizer, config).pair_prompts(["{query}"], ["{document}"]).input_ids[0]
    )
    assert rendered.startswith("<|im_start|>user\n" + template + "<|im_end|>")


def test_system_message_is_rendered(tokenizer):
    builder = PromptBuilder(tokenizer, PromptConfig(system="You judge relevance."))
    assert tokenizer.decode(builder.pair_prompts(["q"], ["d"]).input_ids[0]).startswith(
        "<|im_start|>system\nYou judge relevance."
    )


def test_query_prompt_is_the_pair_prompt_with_an_empty_document(tokenizer):
    builder = PromptBuilder(tokenizer)
    assert (
        builder.query_prompts(["some query"]).input_ids
        == builder.pair_prompts(["some query"], [""]).input_ids
    )
    doc = builder.document_prompts(["only the document"])
    assert tokenizer.decode(doc.input_ids[0]) == "only the document"
    with pytest.raises(ValueError, match="document 1 is empty"):
        builder.document_prompts(["fine", ""])


def test_truncation_cuts_documents_at_the_end_and_queries_at_the_start(tokenizer):
    config = PromptConfig(max_doc_tokens=6, max_query_tokens=5)
    builder = PromptBuilder(tokenizer, config)
    doc = "first words of the document then many more words that will not fit"
    query = "Seeker: an old turn that will be cut\nSupporter: the latest turn"
    short = builder.pair_prompts(["hi"], ["short"])
    cut = builder.pair_prompts([query], [doc])
    assert cut.doc_truncated == [True] and cut.query_truncated == [True] and cut.truncated == [True]
    assert short.doc_truncated == short.query_truncated == short.truncated == [False]
    assert cut.doc_tokens == [6] and cut.query_tokens == [5]
    text = tokenizer.decode(cut.input_ids[0])
    full_doc = tokenizer(doc, add_special_tokens=False).input_ids
    full_query = tokenizer(query, add_special_tokens=False).input_ids
    assert tokenizer.decode(full_doc[:6]) in text and tokenizer.decode(full_doc[6:]) not in text
    assert tokenizer.decode(full_query[-5:]) in text and "an old turn" not in text
    # Instruction and answer position survive any truncation.
    assert f"user\n{config.task_instruction} {config.answer_hint}\n\n" in text
    assert text.endswith("<|im_end|>\n<|im_start|>assistant\n")
    closing = PromptBuilder(tokenizer, dataclasses.replace(config, instruction_first=False))
    text = tokenizer.decode(closing.pair_prompts([query], [doc]).input_ids[0])
    assert text.endswith(f"{config.task_instruction} {config.answer_hint}<|im_end|>\n<|im_start|>assistant\n")
    expected_len = len(short.input_ids[0]) - short.doc_tokens[0] - short.query_tokens[0] + 6 + 5
    assert len(cut.input_ids[0]) == expected_len
    docs = builder.document_prompts([doc])
    assert docs.doc_truncated == [True] and docs.input_ids[0] == full_doc[:6]


def test_cut_documents_keeps_the_first_tokens(tokenizer):
    """A caller's per-request limit (rerank's ``max_tokens_per_doc``): the first N tokens, then the prompt limits."""
    builder = PromptBuilder(tokenizer)
    doc = "first words of the document then many more words that will not fit"
    full_doc = tokenizer(doc, add_special_tokens=False).input_ids
    texts, cut = builder.cut_documents([doc, "short", doc], 4)
    assert cut == [True, False, True] and texts[1] == "short" and texts[0] == texts[2]
    assert tokenizer(texts[0], add_special_tokens=False).input_ids == full_doc[:4]
    assert builder.cut_documents([doc], len(full_doc)) == ([doc], [False])
    assert builder.cut_documents([doc], None) == ([doc], [False])


def test_a_long_text_costs_tokenising_a_window_not_the_whole_text(tokenizer, monkeypatch):
    """Hostile input: a text of any length is tokenised through a window bounded by the token limit, and the
    prompts equal those the whole text's tokenisation gives (cut documents keep their start, queries their end)."""
    from rabtriever_ray import prompts as prompts_module

    config = PromptConfig(max_doc_tokens=16, max_query_tokens=12)
    builder = PromptBuilder(tokenizer, config)
    words = " ".join(f"w{i % 97}x{i}" for i in range(5000))  # about 40k characters of distinct words
    long_texts = [words, "z" * 40_000, " " * 40_000 + "tail", "é" * 40_000]  # one "word"; spaces; 2-byte chars
    whole = {text: tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) for text in long_texts}
    references = {  # the same pairs, already short: nothing to cut
        text: builder.pair_prompts(
            [tokenizer.decode(whole[text].input_ids[-12:])], [tokenizer.decode(whole[text].input_ids[:16])]
        )
        for text in long_texts
    }
    seen = []
    call = type(tokenizer).__call__

    def counting(self, texts, *args, **kwargs):
        seen.extend([texts] if isinstance(texts, str) else texts)
        return call(self, texts, *args, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting)
    bound = (16 + 2 + prompts_module.WINDOW_GUARD_TOKENS) * prompts_module.WINDOW_CHARS_PER_TOKEN * 4**3
    for text in long_texts:
        seen.clear()
        docs = builder.document_prompts([text])
        pairs = builder.pair_prompts([text], [text])
        cut, flags = builder.cut_documents([text], 5)
        assert max(len(t) for t in seen) <= bound < len(text)
        assert docs.input_ids[0] == whole[text].input_ids[:16] and docs.doc_truncated == [True]
        assert cut[0] == text[: whole[text].offset_mapping[4][1]] and flags == [True]  # as cut from the whole
        assert pairs.input_ids == references[text].input_ids, text[:20]
        assert pairs.doc_truncated == pairs.query_truncated == [True]
    # Short texts are never windowed or cut.
    assert builder.document_prompts(["short text"]).input_ids[0] == tokenizer("short text").input_ids


def test_answer_tokens_resolve_to_single_tokens(tokenizer):
    builder = PromptBuilder(tokenizer)
    assert tokenizer.decode([builder.yes_id]) == "yes" and tokenizer.decode([builder.no_id]) == "no"
    assert builder.yes_id != builder.no_id


def test_multi_token_answer_is_a_clear_error(tokenizer):
    with pytest.raises(PromptError, match="cannot express the answer 'Absolutely'"):
        PromptBuilder(tokenizer, PromptConfig(answer_yes="Absolutely"))


def test_pair_lists_must_align(tokenizer):
    with pytest.raises(ValueError, match="must align"):
        PromptBuilder(tokenizer).pair_prompts(["a", "b"], ["c"])


def test_document_text_joins_title():
    assert document_text("Title", "Body") == "Title\nBody"
    assert document_text("", "Body") == document_text(None, "Body") == "Body"
