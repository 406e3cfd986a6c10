"""Prompt presets: the template, slot order and score rule of each generative reranker a teacher can be.

A reranker scores well only with the prompt it was trained on, token for token. A preset fixes the three parts
that must agree with its training (`PromptConfig.preset` selects one; ``prompt.instruction`` and the truncation
limits still override their parts):

- **units**: the prompt as pieces that are tokenised one by one and concatenated, as the model's reference code
  builds its inputs (a fixed token id such as BOS is a unit of its own). A unit holds literal text and at most
  the two slots, ``{query}`` and ``{document}``; text inside one unit is tokenised jointly, so where the reference
  tokenises a whole formatted pair at once, the preset does too.
- **order**: which slot comes first. Pairs that share everything up to the second slot (a document's pairs with
  the document first, a query's candidates with the query first) share that part of the forward pass.
- **score rule** (`ScoreRule`), read at the prompt's last token from the model's own logits:
  ``logit_difference`` = ``logit(yes) - logit(no)`` (= ``logp(yes) - logp(no)``; the log-softmax normaliser
  cancels) and ``yes_logit`` = the raw logit of the yes token.

=====================  ======  =================  ==========================================================
preset                 order   score              reference
=====================  ======  =================  ==========================================================
rabtriever             doc     logit_difference   this project (the paper's document-first template)
qwen3-reranker         query   logit_difference   Qwen/Qwen3-Reranker-{0.6B,4B,8B} model card
bge-reranker-gemma     query   yes_logit          FlagEmbedding ``inference/reranker/decoder_only/base.py``
mxbai-rerank-v2        query   logit_difference   mixedbread-ai/mxbai-rerank ``mxbai_rerank_v2.py``
=====================  ======  =================  ==========================================================

Qwen3-Reranker publishes ``softmax([logit_no, logit_yes])[1]``, which is ``sigmoid(score)`` of its
``logit_difference``; FlagEmbedding's ``normalize=True`` is ``sigmoid(score)`` of its ``yes_logit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

QUERY = "\u2063RABTRIEVER_QUERY\u2063"  # slot markers inside a unit's text
DOCUMENT = "\u2063RABTRIEVER_DOC\u2063"

ScoreRule = Literal["logit_difference", "yes_logit"]

_QWEN3_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".'
)
_BGE_PROMPT = (
    "Given a query A and a passage B, determine whether the passage contains an answer to the query by "
    "providing a prediction of either 'Yes' or 'No'."
)
_MXBAI_TASK = (
    "You are a search relevance expert who evaluates how well documents match search queries. For each "
    "query-document pair, carefully analyze the semantic relationship between them, then provide your binary "
    "relevance judgment (0 for not relevant, 1 for relevant).\nRelevance:"
)
_QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


@dataclass(frozen=True)
class Preset:
    """One reranker's prompt format (see the module docstring)."""

    name: str
    query_first: bool
    score_rule: ScoreRule
    answer_yes: str
    answer_no: str
    instruction: str | None  # the default of ``prompt.instruction``
    source: str
    scale: str  # what a score means, for the docs and the API

    def units(self, instruction: str | None, bos_id: int | None) -> list[str | int]:
        """The prompt as tokenisation units: text with the slot markers `QUERY` / `DOCUMENT`, or a token id."""
        if self.name == "qwen3-reranker":
            return [
                f"<|im_start|>system\n{_QWEN3_SYSTEM}<|im_end|>\n<|im_start|>user\n",
                f"<Instruct>: {instruction}\n<Query>: {QUERY}\n<Document>: {DOCUMENT}",
                "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
            ]
        if self.name == "bge-reranker-gemma":
            return [
                *([bos_id] if bos_id is not None else []),
                f"A: {QUERY}",
                "\n",
                f"B: {DOCUMENT}",
                "\n",
            ] + [instruction or _BGE_PROMPT]
        if self.name == "mxbai-rerank-v2":
            query = f"instruction: {instruction}\nquery: {QUERY}" if instruction else f"query: {QUERY}"
            return [
                f"<|im_start|>system\n{_QWEN_DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n",
                query,
                "\n",
                f"document: {DOCUMENT}",
                "\n",
                _MXBAI_TASK,
                "<|im_end|>\n<|im_start|>assistant\n",
            ]
        raise ValueError(
            f"preset {self.name!r} renders through the tokenizer's chat template (PromptBuilder)"
        )


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "rabtriever",
            query_first=False,
            score_rule="logit_difference",
            answer_yes="yes",
            answer_no="no",
            instruction="Is this document relevant to the query?",
            source="this project: the model's chat template around 'Document: ... Query: ... <instruction>'",
            scale="logp(yes) - logp(no): log-odds, 0 = undecided",
        ),
        Preset(
            "qwen3-reranker",
            query_first=True,
            score_rule="logit_difference",
            answer_yes="yes",
            answer_no="no",
            instruction="Given a web search query, retrieve relevant passages that answer the query",
            source="https://huggingface.co/Qwen/Qwen3-Reranker-0.6B (model card: format_instruction, "
            "process_inputs, compute_logits)",
            scale="logit(yes) - logit(no): log-odds; sigmoid gives the model card's probability",
        ),
        Preset(
            "bge-reranker-gemma",
            query_first=True,
            score_rule="yes_logit",
            answer_yes="Yes",
            answer_no="No",
            instruction=_BGE_PROMPT,
            source="https://github.com/FlagOpen/FlagEmbedding FlagEmbedding/inference/reranker/decoder_only/"
            "base.py (BaseLLMReranker.compute_score_single_gpu)",
            scale="logit(Yes): unbounded; sigmoid gives FlagEmbedding's normalize=True score",
        ),
        Preset(
            "mxbai-rerank-v2",
            query_first=True,
            score_rule="logit_difference",
            answer_yes="1",
            answer_no="0",
            instruction=None,
            source="https://github.com/mixedbread-ai/mxbai-rerank mxbai_rerank/mxbai_rerank_v2.py "
            "(MxbaiRerankV2.prepare_inputs, forward)",
            scale="logit(1) - logit(0): log-odds, as MxbaiRerankV2.predict returns",
        ),
    )
}
PRESET_NAMES = tuple(PRESETS)
