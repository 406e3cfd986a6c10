"""The teacher: a generative reranker that reads document and query together and answers yes or no.

``GenerativeReranker.score(queries, documents)`` runs one LLM pass per pair (quadratic in the pair's length) and
returns, per pair, the score ``logp_yes - logp_no`` at the answer position, the two log-probabilities
(log-softmax over the full vocabulary), and the final-layer hidden state at the answer position *before* the
final norm: the contextual query embedding the student learns to predict. ``lm_head(final_norm(hidden))``
reproduces the teacher's logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import PromptConfig, TeacherConfig
from .models import last_token_hidden, load_causal_lm
from .prompts import PromptBuilder
from .scoring import YesNoHead

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TeacherScores:
    """Per-pair teacher outputs, all on CPU; ``n`` pairs, hidden size ``d``."""

    score: torch.Tensor  # [n] float32, logp_yes - logp_no
    logp_yes: torch.Tensor  # [n] float32
    logp_no: torch.Tensor  # [n] float32
    hidden: torch.Tensor  # [n, d] float32, pre-final-norm hidden state at the answer position
    query_tokens: torch.Tensor  # [n] int32, query tokens kept after truncation
    doc_tokens: torch.Tensor  # [n] int32, document tokens kept after truncation
    truncated: torch.Tensor  # [n] bool, query or document was cut


class GenerativeReranker:
    """Scores (query, document) pairs with a causal LM's yes/no answer.

    Args:
        model, tokenizer: from `load_causal_lm`.
        prompt_config: the prompt template, answer words and truncation limits.
        max_batch_tokens: padded tokens per forward batch; pairs are sorted by length to keep padding low.
    """

    def __init__(
        self, model, tokenizer, prompt_config: PromptConfig | None = None, max_batch_tokens: int = 8192
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, prompt_config)
        self.head = YesNoHead(model, self.prompts.yes_id, self.prompts.no_id)
        self.max_batch_tokens = max_batch_tokens

    @classmethod
    def from_config(
        cls, config: TeacherConfig, device: str | torch.device | None = None
    ) -> GenerativeReranker:
        model, tokenizer = load_causal_lm(config.model, device=device, dtype=_DTYPES.get(config.dtype))
        return cls(model, tokenizer, config.prompt, config.max_batch_tokens)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def encode(self, input_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """Pre-norm last-token hidden states ``[n, d]`` of already-built prompts."""
        return last_token_hidden(
            self.model,
            input_ids,
            pad_id=self.tokenizer.pad_token_id,
            padding_side=self.tokenizer.padding_side,
            max_batch_tokens=self.max_batch_tokens,
        )

    def score(self, queries: Sequence[str], documents: Sequence[str], head_chunk: int = 256) -> TeacherScores:
        """Score aligned ``queries[i]`` / ``documents[i]`` pairs (see `TeacherScores`)."""
        prompts = self.prompts.pair_prompts(queries, documents)
        hidden = self.encode(prompts.input_ids)
        answers = torch.empty(
            (3, len(hidden)), dtype=torch.float32
        )  # ordinary tensor, filled in inference mode
        with torch.inference_mode():
            for start in range(0, len(hidden), head_chunk):
                chunk = self.head.log_probs(hidden[start : start + head_chunk])
                answers[:, start : start + head_chunk] = torch.stack(chunk).cpu()
        score, logp_yes, logp_no = answers
        return TeacherScores(
            score=score,
            logp_yes=logp_yes,
            logp_no=logp_no,
            hidden=hidden,
            query_tokens=torch.tensor(prompts.query_tokens, dtype=torch.int32),
            doc_tokens=torch.tensor(prompts.doc_tokens, dtype=torch.int32),
            truncated=torch.tensor(prompts.truncated, dtype=torch.bool),
        )
