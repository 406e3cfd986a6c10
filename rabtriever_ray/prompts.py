"""Prompt templates and token-level truncation, shared by the teacher and the student.

Teacher prompt (one pass per pair)::

    <chat template>{doc_label}:\\n{DOCUMENT}\\n\\n{query_label}:\\n{QUERY}\\n\\n{instruction} {answer_hint}<answer prompt>

The score is read at the last prompt token (the answer position), where the model would write "yes" or "no".
The student's query prompt is the same template with the document slot left empty, so its hidden state sits at
the same answer position; the student's document prompt is the document alone, read at its last token.

The template is rendered once with sentinels and split into fixed segments; documents and queries are tokenised
on their own and spliced in. That makes truncation exact: documents lose tokens at the end, queries (often
dialogue context) at the start so the latest turns survive, and the instruction and answer position are never
cut.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import PromptConfig

_DOC_SENTINEL = "\u2063RABTRIEVER_DOC\u2063"
_QUERY_SENTINEL = "\u2063RABTRIEVER_QUERY\u2063"


class PromptError(ValueError):
    """A tokenizer or prompt configuration that cannot produce the prompts this method needs."""


def document_text(title: str | None, text: str) -> str:
    """The text a document is read as: its title on the first line when it has one."""
    title = (title or "").strip()
    return f"{title}\n{text}" if title else text


@dataclass
class EncodedPrompts:
    """Token ids of a batch of prompts with their truncation bookkeeping (one entry per prompt)."""

    input_ids: list[list[int]] = field(default_factory=list)
    query_tokens: list[int] = field(default_factory=list)  # query tokens kept (0 for document prompts)
    doc_tokens: list[int] = field(default_factory=list)  # document tokens kept (0 for query prompts)
    query_truncated: list[bool] = field(default_factory=list)
    doc_truncated: list[bool] = field(default_factory=list)
    # Leading tokens that depend only on the document (template + document + label), and on nothing (template):
    # prompts that share them can share that part of the forward pass. 0 where nothing is shared.
    shared_tokens: list[int] = field(default_factory=list)
    template_tokens: int = 0

    @property
    def truncated(self) -> list[bool]:
        return [q or d for q, d in zip(self.query_truncated, self.doc_truncated, strict=True)]

    @property
    def n_truncated(self) -> int:
        return sum(self.truncated)

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptBuilder:
    """Renders teacher pair prompts, student query prompts and document prompts as token ids.

    ``yes_id`` / ``no_id`` are the single tokens the model writes at the answer position for the configured
    answer words, resolved from the tokenizer as the template renders them.
    """

    def __init__(self, tokenizer, config: PromptConfig | None = None):
        self.tokenizer = tokenizer
        self.config = config or PromptConfig()
        self._prefix, self._middle, self._suffix = self._render_segments()
        # Document prompts start like any tokenizer-encoded text (a BOS token where the model uses one).
        bos = tokenizer.bos_token_id
        encoded = tokenizer("a", add_special_tokens=True).input_ids
        self._doc_prefix = [bos] if bos is not None and encoded[:1] == [bos] else []
        self.yes_id = self._answer_token(self.config.answer_yes)
        self.no_id = self._answer_token(self.config.answer_no)

    # -- template ---------------------------------------------------------------------------------------------

    def _render(self, document: str, query: str) -> str:
        c = self.config
        user = f"{c.doc_label}:\n{document}\n\n{c.query_label}:\n{query}\n\n{c.instruction} {c.answer_hint}".strip()
        if getattr(self.tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": c.system}] if c.system else []) + [
                {"role": "user", "content": user}
            ]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        system = f"{c.system}\n\n" if c.system else ""
        return f"{system}{user}\nAnswer:"

    def _render_segments(self) -> tuple[list[int], list[int], list[int]]:
        text = self._render(_DOC_SENTINEL, _QUERY_SENTINEL)
        if text.count(_DOC_SENTINEL) != 1 or text.count(_QUERY_SENTINEL) != 1:
            raise PromptError("the chat template must render the user message exactly once")
        prefix, rest = text.split(_DOC_SENTINEL)
        middle, suffix = rest.split(_QUERY_SENTINEL)
        self._suffix_text = suffix
        tokens = self._tokenize([prefix, middle, suffix])
        if not getattr(self.tokenizer, "chat_template", None) and self.tokenizer.bos_token_id is not None:
            tokens[0] = [self.tokenizer.bos_token_id] + tokens[0]
        return tokens[0], tokens[1], tokens[2]

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(list(texts), add_special_tokens=False).input_ids

    def _answer_token(self, word: str) -> int:
        """The one token that spells ``word`` right after the answer prompt, or a clear error."""
        # The suffix segment ends with the answer prompt; tokenise it with the answer appended.
        prompt = self._suffix
        with_answer = self._tokenize([self._suffix_text + word])[0]
        extra = with_answer[len(prompt) :]
        if with_answer[: len(prompt)] != prompt or len(extra) != 1:
            pieces = [self.tokenizer.decode([t]) for t in extra]
            raise PromptError(
                f"the tokenizer cannot express the answer {word!r} as a single token after the answer prompt "
                f"(it becomes {len(extra)} tokens {pieces}); set prompt.answer_yes / prompt.answer_no to words it can"
            )
        return extra[0]

    # -- prompts ----------------------------------------------------------------------------------------------

    def _truncate_documents(self, documents: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        limit = self.config.max_doc_tokens
        ids = self._tokenize(documents)
        return [d[:limit] for d in ids], [len(d) > limit for d in ids]

    def _truncate_queries(self, queries: Sequence[str]) -> tuple[list[list[int]], list[bool]]:
        limit = self.config.max_query_tokens
        ids = self._tokenize(queries)
        return [q[-limit:] for q in ids], [len(q) > limit for q in ids]

    def pair_prompts(self, queries: Sequence[str], documents: Sequence[str]) -> EncodedPrompts:
        """Teacher prompts for aligned (query, document) lists: document first, then query, then the question."""
        if len(queries) != len(documents):
            raise ValueError(f"queries and documents must align: {len(queries)} != {len(documents)}")
        query_ids, query_cut = self._truncate_queries(queries)
        doc_ids, doc_cut = self._truncate_documents(documents)
        return EncodedPrompts(
            input_ids=[
                self._prefix + d + self._middle + q + self._suffix
                for q, d in zip(query_ids, doc_ids, strict=True)
            ],
            query_tokens=[len(q) for q in query_ids],
            doc_tokens=[len(d) for d in doc_ids],
            query_truncated=query_cut,
            doc_truncated=doc_cut,
            shared_tokens=[len(self._prefix) + len(d) + len(self._middle) for d in doc_ids],
            template_tokens=len(self._prefix),
        )

    def query_prompts(self, queries: Sequence[str]) -> EncodedPrompts:
        """Student query prompts: the teacher template with an empty document slot."""
        return self.pair_prompts(queries, [""] * len(queries))

    def document_prompts(self, documents: Sequence[str]) -> EncodedPrompts:
        """Student document prompts: the document alone (after the tokenizer's BOS, if it uses one)."""
        doc_ids, doc_cut = self._truncate_documents(documents)
        for index, ids in enumerate(doc_ids):
            if not ids and not self._doc_prefix:
                raise ValueError(f"document {index} is empty: there is no token to read its embedding from")
        return EncodedPrompts(
            input_ids=[self._doc_prefix + d for d in doc_ids],
            query_tokens=[0] * len(doc_ids),
            doc_tokens=[len(d) for d in doc_ids],
            query_truncated=[False] * len(doc_ids),
            doc_truncated=doc_cut,
            shared_tokens=[0] * len(doc_ids),
        )
