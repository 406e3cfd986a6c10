"""Prompt templates and token-level truncation, shared by the teacher and the student.

Teacher prompt (one pass per pair)::

    <chat template>{doc_label}:\\n{DOCUMENT}\\n\\n{query_label}:\\n{QUERY}\\n\\n{instruction} {answer_hint}<answer prompt>

``<answer prompt>`` is the chat template's generation prompt (rendered with ``enable_thinking`` for templates
that have a thinking mode) followed by ``answer_prefix``. The score is read at its last token (the answer
position), where the model would write "yes" or "no". The student's query prompt is the same template with the
document slot left empty, so its hidden state sits at the same answer position; the student's document prompt is
the document alone, read at its last token.

Each prompt is tokenised in one piece, exactly as ``tokenizer.apply_chat_template(..., tokenize=True)`` would
tokenise it: splicing separately tokenised segments gives token sequences a model never saw in training
(SentencePiece-style tokenizers put a stray "▁" before every segment; byte-level BPE merges differently across a
newline that ends a document or spaces that start a query). Truncation stays exact through the tokenizer's
character offsets: documents lose tokens at the end, queries (often dialogue context) at the start so the latest
turns survive, and the instruction and answer position are never cut. A fast (Rust) tokenizer is required for
the offsets.
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


def _overlapping(offsets: Sequence[tuple[int, int]], start: int, end: int) -> list[int]:
    """Indices of the tokens whose characters overlap ``[start, end)``. None for an empty span, even where one
    token covers it (SmolLM2's byte-level BPE merges the newlines around an empty document into one): a student
    query prompt holds no document, so everything before its query is shareable (`GenerativeReranker.encode`)."""
    return [k for k, (a, b) in enumerate(offsets) if a < end and b > start] if end > start else []


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
    template_tokens: list[int] = field(default_factory=list)
    # Index of the first query token (its ``query_tokens`` tokens follow); 0 for document prompts. It is at or
    # after ``shared_tokens``: a shared prefix never holds a query token.
    query_start: list[int] = field(default_factory=list)

    @property
    def truncated(self) -> list[bool]:
        return [q or d for q, d in zip(self.query_truncated, self.doc_truncated, strict=True)]

    def __len__(self) -> int:
        return len(self.input_ids)


class PromptBuilder:
    """Renders teacher pair prompts, student query prompts and document prompts as token ids.

    ``yes_id`` / ``no_id`` are the single tokens the model writes at the answer position for the configured
    answer words, resolved from the tokenizer as a whole prompt tokenises them.
    """

    def __init__(self, tokenizer, config: PromptConfig | None = None):
        if not getattr(tokenizer, "is_fast", False):
            raise PromptError(
                f"{type(tokenizer).__name__} is a slow (Python) tokenizer; prompts need a fast tokenizer's "
                "character offsets: load the model folder with a tokenizer.json (AutoTokenizer converts most slow "
                "tokenizers when the sentencepiece/tiktoken package is installed)"
            )
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

    @staticmethod
    def template_text(config: PromptConfig, document: str = "{document}", query: str = "{query}") -> str:
        """The user message of the teacher prompt, before any chat template (by default with ``{document}`` /
        ``{query}`` placeholders: what the teacher-scores manifest records). Needs no tokenizer."""
        c = config
        return f"{c.doc_label}:\n{document}\n\n{c.query_label}:\n{query}\n\n{c.instruction} {c.answer_hint}".strip()

    def _render(self, document: str, query: str) -> str:
        c = self.config
        user = self.template_text(c, document, query)
        if getattr(self.tokenizer, "chat_template", None):
            messages = ([{"role": "system", "content": c.system}] if c.system else []) + [
                {"role": "user", "content": user}
            ]
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True, enable_thinking=c.enable_thinking
            )
        else:
            system = f"{c.system}\n\n" if c.system else ""
            bos = self.tokenizer.bos_token or ""
            text = f"{bos}{system}{user}\nAnswer:"
        return text + c.answer_prefix

    def _render_segments(self) -> tuple[str, str, str]:
        """The rendered template's text before the document, between document and query, and after the query."""
        text = self._render(_DOC_SENTINEL, _QUERY_SENTINEL)
        if text.count(_DOC_SENTINEL) != 1 or text.count(_QUERY_SENTINEL) != 1:
            raise PromptError("the chat template must render the user message exactly once")
        prefix, rest = text.split(_DOC_SENTINEL)
        middle, suffix = rest.split(_QUERY_SENTINEL)
        opened, closed = suffix.rfind("<think>"), suffix.rfind("</think>")
        if opened > closed:
            raise PromptError(
                f"the chat template of {type(self.tokenizer).__name__} opens a thinking block after the query "
                f"({suffix[opened:]!r}), so the next token is not the answer; set prompt.enable_thinking=false, "
                "or close the block with prompt.answer_prefix"
            )
        return prefix, middle, suffix

    def _tokenize(self, texts: Sequence[str]):
        return self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)

    def _answer_token(self, word: str) -> int:
        """The one token that spells ``word`` right after the answer prompt, or a clear error."""
        prompt = self._prefix + "a" + self._middle + "b" + self._suffix
        ids, with_answer = self._tokenize([prompt, prompt + word]).input_ids
        extra = with_answer[len(ids) :]
        if with_answer[: len(ids)] != ids or len(extra) != 1:
            pieces = [self.tokenizer.decode([t]) for t in with_answer[len(ids) - 1 :]]
            raise PromptError(
                f"the tokenizer cannot express the answer {word!r} as a single token after the answer prompt "
                f"(the prompt's last token and the answer become {pieces}); set prompt.answer_yes / "
                "prompt.answer_no to words it can"
            )
        return extra[0]

    # -- prompts ----------------------------------------------------------------------------------------------

    def _precut(
        self, texts: Sequence[str], limit: int, keep_end: bool, slack: int = 2
    ) -> tuple[list[str], list[bool]]:
        """Texts cut, on their own tokenisation, to ``limit + slack`` tokens. By default a little over ``limit``,
        so that tokenising whole prompts stays cheap for long texts; `pair_prompts` then cuts them exactly in
        context."""
        margin = limit + slack
        unique = sorted({t for t in texts if len(t.encode("utf-8")) + 1 > margin})
        cut: dict[str, str] = {}
        if unique:
            for text, offsets in zip(unique, self._tokenize(unique).offset_mapping, strict=True):
                if len(offsets) > margin:
                    cut[text] = text[offsets[-margin][0] :] if keep_end else text[: offsets[margin - 1][1]]
        return [cut.get(t, t) for t in texts], [t in cut for t in texts]

    def cut_documents(self, documents: Sequence[str], max_tokens: int | None) -> tuple[list[str], list[bool]]:
        """Documents cut at the end to their first ``max_tokens`` tokens (on their own tokenisation; a caller's
        limit, e.g. a rerank request's ``max_tokens_per_doc``), and whether each was cut. ``None``: unchanged.
        The prompts then still apply ``max_doc_tokens``."""
        if max_tokens is None:
            return list(documents), [False] * len(documents)
        return self._precut(documents, max_tokens, keep_end=False, slack=0)

    def pair_prompts(self, queries: Sequence[str], documents: Sequence[str]) -> EncodedPrompts:
        """Teacher prompts for aligned (query, document) lists: document first, then query, then the question."""
        if len(queries) != len(documents):
            raise ValueError(f"queries and documents must align: {len(queries)} != {len(documents)}")
        doc_limit, query_limit = self.config.max_doc_tokens, self.config.max_query_tokens
        docs, doc_cut = self._precut(documents, doc_limit, keep_end=False)
        queries, query_cut = self._precut(queries, query_limit, keep_end=True)
        out = EncodedPrompts()
        pending = list(range(len(docs)))
        results: dict[int, tuple] = {}
        # A cut changes the tokens at the cut only; the next pass settles it.
        for attempt in range(3 if pending else 0):
            texts = [self._prefix + docs[i] + self._middle + queries[i] + self._suffix for i in pending]
            encoded = self._tokenize(texts)
            again = []
            for i, ids, offsets in zip(pending, encoded.input_ids, encoded.offset_mapping, strict=True):
                doc_start = len(self._prefix)
                doc_end = doc_start + len(docs[i])
                query_start = doc_end + len(self._middle)
                query_end = query_start + len(queries[i])
                in_doc = _overlapping(offsets, doc_start, doc_end)
                in_query = _overlapping(offsets, query_start, query_end)
                over = len(in_doc) > doc_limit or len(in_query) > query_limit
                if over and attempt < 2:
                    if len(in_doc) > doc_limit:
                        docs[i] = docs[i][: max(offsets[in_doc[doc_limit]][0] - doc_start, 0)]
                        doc_cut[i] = True
                    if len(in_query) > query_limit:
                        last_dropped = in_query[len(in_query) - query_limit - 1]
                        queries[i] = queries[i][max(offsets[last_dropped][1] - query_start, 0) :]
                        query_cut[i] = True
                    again.append(i)
                    continue
                template = sum(1 for _, b in offsets if b <= doc_start)
                shared = sum(1 for _, b in offsets if b <= query_start)
                start = in_query[0] if in_query else shared
                results[i] = (ids, len(in_query), len(in_doc), template, shared, start)
            pending = again
            if not pending:
                break
        for i in range(len(docs)):
            ids, n_query, n_doc, template, shared, start = results[i]
            out.input_ids.append(ids)
            out.query_start.append(start)
            out.query_tokens.append(n_query)
            out.doc_tokens.append(n_doc)
            out.template_tokens.append(template)
            out.shared_tokens.append(shared)
        out.query_truncated = query_cut
        out.doc_truncated = doc_cut
        return out

    def query_prompts(self, queries: Sequence[str]) -> EncodedPrompts:
        """Student query prompts: the teacher template with an empty document slot."""
        return self.pair_prompts(queries, [""] * len(queries))

    def document_prompts(self, documents: Sequence[str]) -> EncodedPrompts:
        """Student document prompts: the document alone (after the tokenizer's BOS, if it uses one)."""
        limit = self.config.max_doc_tokens
        ids = self.tokenizer(list(documents), add_special_tokens=False).input_ids if documents else []
        doc_ids, doc_cut = [d[:limit] for d in ids], [len(d) > limit for d in ids]
        for index, kept in enumerate(doc_ids):
            if not kept and not self._doc_prefix:
                raise ValueError(f"document {index} is empty: there is no token to read its embedding from")
        return EncodedPrompts(
            input_ids=[self._doc_prefix + d for d in doc_ids],
            query_tokens=[0] * len(doc_ids),
            doc_tokens=[len(d) for d in doc_ids],
            query_truncated=[False] * len(doc_ids),
            doc_truncated=doc_cut,
            shared_tokens=[0] * len(doc_ids),
            template_tokens=[0] * len(doc_ids),
            query_start=[0] * len(doc_ids),
        )
