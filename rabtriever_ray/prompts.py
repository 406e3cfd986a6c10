"""Prompt templates and token-level truncation, shared by the teacher and the student.

``prompt.preset`` picks the format (`presets`): the default ``rabtriever`` template puts the instruction, then the
document first::

    <chat template>{instruction} {answer_hint}\\n\\n{doc_label}:\\n{DOCUMENT}\\n\\n{query_label}:\\n{QUERY}<answer prompt>

and with ``instruction_first`` false the instruction closes the message, after the query (the paper's order).

``<answer prompt>`` is the chat template's generation prompt (rendered with ``enable_thinking`` for templates
that have a thinking mode) followed by ``answer_prefix``. The published rerankers' presets (Qwen3-Reranker,
bge-reranker-v2-gemma, mxbai-rerank-v2) put the query first, in their own templates. In every format the score is
read at the prompt's last token (the answer position). The student's query prompt is the same template with the
document slot left empty, wherever the slot stands, so its hidden state sits at the same answer position; the
student's document prompt is the document alone, read at its last token.

A prompt is tokenised in the units its format defines (`presets.Preset.units`), each unit in one piece, as the
model's own reference code builds its inputs: the rabtriever template is one unit, exactly as
``tokenizer.apply_chat_template(..., tokenize=True)`` would tokenise it; Qwen3-Reranker's reference tokenises its
prefix, the formatted pair and its suffix separately, FlagEmbedding its ``A: {query}``, separator,
``B: {passage}`` and prompt. Splicing differently gives token sequences a model never saw in training
(SentencePiece-style tokenizers put a stray "▁" before every unit; byte-level BPE merges differently across a
newline that ends a document or spaces that start a query). Truncation stays exact through the tokenizer's
character offsets: documents lose tokens at the end, queries (often dialogue context) at the start so the latest
turns survive, and the instruction and answer position are never cut. A fast (Rust) tokenizer is required for
the offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from .config import PromptConfig
from .presets import DOCUMENT as _DOC_SENTINEL
from .presets import PRESETS
from .presets import QUERY as _QUERY_SENTINEL

# `PromptBuilder._precut` tokenises a long text through a window of this many characters per token kept (then wider
# while the window holds too few tokens), whose edge must stand this many tokens past the cut.
WINDOW_CHARS_PER_TOKEN = 8
WINDOW_GUARD_TOKENS = 8


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


def _fill(unit: str, query: str, document: str) -> tuple[str, dict[str, tuple[int, int]]]:
    """A unit's text with its slots filled, and each slot's character span ``[start, end)`` in it."""
    text, spans, rest = "", {}, unit
    while True:
        found = [
            (rest.find(marker), name, marker, value)
            for name, marker, value in (("query", _QUERY_SENTINEL, query), ("doc", _DOC_SENTINEL, document))
            if marker in rest
        ]
        if not found:
            return text + rest, spans
        at, name, marker, value = min(found)
        text += rest[:at]
        spans[name] = (len(text), len(text) + len(value))
        text += value
        rest = rest[at + len(marker) :]


@dataclass
class EncodedPrompts:
    """Token ids of a batch of prompts with their truncation bookkeeping (one entry per prompt)."""

    input_ids: list[list[int]] = field(default_factory=list)
    query_tokens: list[int] = field(default_factory=list)  # query tokens kept (0 for document prompts)
    doc_tokens: list[int] = field(default_factory=list)  # document tokens kept (0 for query prompts)
    query_truncated: list[bool] = field(default_factory=list)
    doc_truncated: list[bool] = field(default_factory=list)
    # Leading tokens that depend only on the slot that comes first (template + that slot + what follows it up to
    # the second slot), and on nothing (the template before the first slot): prompts that share them can share
    # that part of the forward pass. 0 where nothing is shared.
    shared_tokens: list[int] = field(default_factory=list)
    template_tokens: list[int] = field(default_factory=list)
    # Tokens kept of the slot that comes first (the document, or the query in a query-first format): 0 means the
    # shared prefix depends on no text at all (a student query prompt's empty document slot, document first).
    first_slot_tokens: list[int] = field(default_factory=list)
    # Index of the first query token (its ``query_tokens`` tokens follow); 0 for document prompts.
    query_start: list[int] = field(default_factory=list)

    @property
    def truncated(self) -> list[bool]:
        return [q or d for q, d in zip(self.query_truncated, self.doc_truncated, strict=True)]

    def __len__(self) -> int:
        return len(self.input_ids)

    def select(self, rows: Sequence[int]) -> EncodedPrompts:
        """The prompts ``rows``, in that order."""
        return EncodedPrompts(**{f.name: [getattr(self, f.name)[i] for i in rows] for f in fields(self)})


class PromptBuilder:
    """Renders teacher pair prompts, student query prompts and document prompts as token ids.

    ``yes_id`` / ``no_id`` are the answer tokens the score reads: for the rabtriever preset, the single tokens
    the configured answer words become right after the answer prompt; for a published reranker's preset, the
    ids its reference code takes (the first token of the answer word tokenised alone). ``query_first`` and
    ``score_rule`` come from the preset.
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
        self.preset = PRESETS[self.config.preset]
        self.query_first = self.preset.query_first
        self.score_rule = self.preset.score_rule
        self._units = self._render_units()
        self._constant: dict[int, list[int]] = {}  # token ids of the units without a slot
        # Document prompts start like any tokenizer-encoded text (a BOS token where the model uses one).
        bos = tokenizer.bos_token_id
        encoded = tokenizer("a", add_special_tokens=True).input_ids
        self._doc_prefix = [bos] if bos is not None and encoded[:1] == [bos] else []
        self.yes_id = self._answer_token(self._answer_words[0])
        self.no_id = self._answer_token(self._answer_words[1])
        if self.yes_id == self.no_id:
            raise PromptError(
                f"the answer words {self._answer_words} start with the same token {self.yes_id}"
            )

    # -- template ---------------------------------------------------------------------------------------------

    @staticmethod
    def template_text(config: PromptConfig, document: str = "{document}", query: str = "{query}") -> str:
        """The user message of the teacher prompt, before any chat template (by default with ``{document}`` /
        ``{query}`` placeholders: what the teacher-scores manifest records). Needs no tokenizer. For a published
        reranker's preset, its units joined (a BOS token left out)."""
        c = config
        if c.preset != "rabtriever":
            units = PRESETS[c.preset].units(c.task_instruction, None)
            text = "".join(unit for unit in units if isinstance(unit, str))
            return text.replace(_DOC_SENTINEL, document).replace(_QUERY_SENTINEL, query)
        instruction = f"{c.task_instruction} {c.answer_hint}".strip()
        slots = f"{c.doc_label}:\n{document}\n\n{c.query_label}:\n{query}"
        if c.instruction_first:
            return f"{instruction}\n\n{slots}".strip()
        return f"{slots}\n\n{instruction}".strip()

    @property
    def _answer_words(self) -> tuple[str, str]:
        if self.config.preset == "rabtriever":
            return self.config.answer_yes, self.config.answer_no
        return self.preset.answer_yes, self.preset.answer_no

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

    def _render_units(self) -> list[str | int]:
        """The prompt's tokenisation units (`presets.Preset.units`); for the rabtriever preset, the chat template
        rendered around the two slots, as one unit."""
        if self.config.preset != "rabtriever":
            bos, pad = self.tokenizer.bos_token_id, self.tokenizer.pad_token_id
            # FlagEmbedding adds BOS only where the tokenizer has one that is not its padding token.
            return self.preset.units(
                self.config.task_instruction, bos if bos is not None and bos != pad else None
            )
        text = self._render(_DOC_SENTINEL, _QUERY_SENTINEL)
        if text.count(_DOC_SENTINEL) != 1 or text.count(_QUERY_SENTINEL) != 1:
            raise PromptError("the chat template must render the user message exactly once")
        suffix = text.split(_QUERY_SENTINEL)[1]
        opened, closed = suffix.rfind("<think>"), suffix.rfind("</think>")
        if opened > closed:
            raise PromptError(
                f"the chat template of {type(self.tokenizer).__name__} opens a thinking block after the query "
                f"({suffix[opened:]!r}), so the next token is not the answer; set prompt.enable_thinking=false, "
                "or close the block with prompt.answer_prefix"
            )
        return [text]

    def _tokenize(self, texts: Sequence[str]):
        return self.tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)

    def _answer_token(self, word: str) -> int:
        """The token id the score reads for ``word`` (see the class docstring), or a clear error."""
        if self.config.preset != "rabtriever":
            ids = self.tokenizer(word, add_special_tokens=False).input_ids
            if not ids:
                raise PromptError(f"the tokenizer turns the answer word {word!r} into no token")
            return ids[0]
        prompt = self._units[0].replace(_DOC_SENTINEL, "a").replace(_QUERY_SENTINEL, "b")
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
        """Texts cut, on their own tokenisation, to ``limit + slack`` tokens (their start, or with ``keep_end`` their
        end), and whether each was cut. By default a little over ``limit``: `pair_prompts` then cuts them exactly
        in context.

        A text is tokenised through a window of characters at the end kept, `WINDOW_CHARS_PER_TOKEN` per token to
        start with and widened while it holds too few tokens, never whole: what tokenising costs is bounded by the
        limit, not by the text (a 32 KiB document cut to 512 tokens costs about 4 KiB of tokenising). The cut
        must stand at least `WINDOW_GUARD_TOKENS` tokens inside the window, so that the window's edge, which
        may split a word, does not move it."""
        margin = limit + slack
        todo = sorted({t for t in texts if len(t.encode("utf-8")) + 1 > margin})
        cut: dict[str, str] = {}
        window = (margin + WINDOW_GUARD_TOKENS) * WINDOW_CHARS_PER_TOKEN
        while todo:
            pieces = [text[-window:] if keep_end else text[:window] for text in todo]
            wider = []
            for text, piece, offsets in zip(todo, pieces, self._tokenize(pieces).offset_mapping, strict=True):
                whole = len(piece) == len(text)
                if len(offsets) <= margin and whole:
                    continue  # fits
                if len(offsets) < margin + WINDOW_GUARD_TOKENS and not whole:
                    wider.append(text)
                elif keep_end:
                    cut[text] = text[len(text) - len(piece) + offsets[-margin][0] :]
                else:
                    cut[text] = text[: offsets[margin - 1][1]]
            todo, window = wider, window * 4
        return [cut.get(t, t) for t in texts], [t in cut for t in texts]

    def cut_documents(self, documents: Sequence[str], max_tokens: int | None) -> tuple[list[str], list[bool]]:
        """Documents cut at the end to their first ``max_tokens`` tokens (on their own tokenisation; a caller's
        limit, e.g. a rerank request's ``max_tokens_per_doc``), and whether each was cut. ``None``: unchanged.
        The prompts then still apply ``max_doc_tokens``."""
        if max_tokens is None:
            return list(documents), [False] * len(documents)
        return self._precut(documents, max_tokens, keep_end=False, slack=0)

    def _encode_units(self, queries: Sequence[str], documents: Sequence[str]) -> list[tuple[list[int], dict]]:
        """Aligned pairs -> per prompt, its token ids and, per slot (``"query"``, ``"doc"``): the index of its first
        token (or where it would stand), its tokens' character spans relative to the slot's text, and the
        number of tokens before the slot. Each unit is tokenised on its own; a unit without a slot once."""
        out = [([], {}) for _ in queries]
        for number, unit in enumerate(self._units):
            if isinstance(unit, int):
                for ids, _ in out:
                    ids.append(unit)
                continue
            if _QUERY_SENTINEL not in unit and _DOC_SENTINEL not in unit:
                if number not in self._constant:
                    self._constant[number] = self._tokenize([unit]).input_ids[0]
                for ids, _ in out:
                    ids.extend(self._constant[number])
                continue
            filled = [_fill(unit, query, doc) for query, doc in zip(queries, documents, strict=True)]
            encoded = self._tokenize([text for text, _ in filled])
            for (ids, slots), (_, spans), unit_ids, offsets in zip(
                out, filled, encoded.input_ids, encoded.offset_mapping, strict=True
            ):
                for slot, (start, end) in spans.items():
                    inside = _overlapping(offsets, start, end)
                    before = len(ids) + sum(1 for _, b in offsets if b <= start)
                    first = len(ids) + inside[0] if inside else before
                    slots[slot] = (
                        first,
                        [(offsets[k][0] - start, offsets[k][1] - start) for k in inside],
                        before,
                    )
                ids.extend(unit_ids)
        return out

    def pair_prompts(self, queries: Sequence[str], documents: Sequence[str]) -> EncodedPrompts:
        """Teacher prompts for aligned (query, document) lists, in the preset's format and order."""
        if len(queries) != len(documents):
            raise ValueError(f"queries and documents must align: {len(queries)} != {len(documents)}")
        doc_limit, query_limit = self.config.max_doc_tokens, self.config.max_query_tokens
        docs, doc_cut = self._precut(documents, doc_limit, keep_end=False)
        queries, query_cut = self._precut(queries, query_limit, keep_end=True)
        first_slot, second_slot = ("query", "doc") if self.query_first else ("doc", "query")
        pending = list(range(len(docs)))
        results: dict[int, tuple] = {}
        # A cut changes the tokens at the cut only; the next pass settles it.
        for attempt in range(3 if pending else 0):
            encoded = self._encode_units([queries[i] for i in pending], [docs[i] for i in pending])
            again = []
            for i, (ids, slots) in zip(pending, encoded, strict=True):
                in_query, in_doc = slots["query"][1], slots["doc"][1]
                over = len(in_doc) > doc_limit or len(in_query) > query_limit
                if over and attempt < 2:
                    if len(in_doc) > doc_limit:
                        docs[i] = docs[i][: max(in_doc[doc_limit][0], 0)]
                        doc_cut[i] = True
                    if len(in_query) > query_limit:
                        queries[i] = queries[i][max(in_query[len(in_query) - query_limit - 1][1], 0) :]
                        query_cut[i] = True
                    again.append(i)
                    continue
                results[i] = (
                    ids,
                    len(in_query),
                    len(in_doc),
                    slots[first_slot][2],  # template: the tokens before the first slot
                    slots[second_slot][2],  # shared: the tokens before the second slot
                    len(slots[first_slot][1]),
                    slots["query"][0],
                )
            pending = again
            if not pending:
                break
        out = EncodedPrompts(query_truncated=query_cut, doc_truncated=doc_cut)
        for i in range(len(docs)):
            ids, n_query, n_doc, template, shared, first_tokens, start = results[i]
            out.input_ids.append(ids)
            out.query_start.append(start)
            out.query_tokens.append(n_query)
            out.doc_tokens.append(n_doc)
            out.template_tokens.append(template)
            out.shared_tokens.append(shared)
            out.first_slot_tokens.append(first_tokens)
        return out

    def query_prompts(self, queries: Sequence[str]) -> EncodedPrompts:
        """Student query prompts: the teacher template with an empty document slot."""
        return self.pair_prompts(queries, [""] * len(queries))

    def document_prompts(self, documents: Sequence[str]) -> EncodedPrompts:
        """Student document prompts: the document alone (after the tokenizer's BOS, if it uses one)."""
        limit = self.config.max_doc_tokens
        documents, _ = self._precut(documents, limit, keep_end=False)
        ids = self.tokenizer(documents, add_special_tokens=False).input_ids if documents else []
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
            first_slot_tokens=[0] * len(doc_ids),
            query_start=[0] * len(doc_ids),
        )
