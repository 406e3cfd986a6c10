"""The one scoring function: how a hidden state at the answer position becomes a relevance score.

Teacher, student, training, evaluation and serving all score through `YesNoHead`, so they cannot disagree::

    logits = lm_head(final_norm(hidden))                  # [n, vocab]
    score  = logp_yes - logp_no = logit_yes - logit_no    # the log-softmax normaliser cancels

`score` reads only the two answer rows of the LM head (cheap enough to score millions of pairs); `log_probs`
also returns the full-vocabulary log-probabilities of "yes" and "no".
"""

from __future__ import annotations

import torch
from torch import nn

from .models import final_norm


class YesNoHead(nn.Module):
    """Frozen final norm + LM head of a causal LM, reading the yes/no answer tokens.

    Args:
        model: the causal LM whose ``final_norm`` and ``lm_head`` are shared (not copied).
        yes_id, no_id: the answer token ids (`PromptBuilder.yes_id` / ``no_id``).
    """

    def __init__(self, model: nn.Module, yes_id: int, no_id: int):
        super().__init__()
        self.norm = final_norm(model)
        self.lm_head = model.get_output_embeddings()
        self.yes_id = int(yes_id)
        self.no_id = int(no_id)

    def _normed(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.lm_head.weight
        return self.norm(hidden.to(device=weight.device, dtype=weight.dtype))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` pre-norm hidden states -> ``[..., vocab]`` float32 logits."""
        return self.lm_head(self._normed(hidden)).float()

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` pre-norm hidden states -> ``[...]`` float32 scores ``logit_yes - logit_no``."""
        ids = torch.tensor([self.yes_id, self.no_id], device=self.lm_head.weight.device)
        rows = self.lm_head.weight[ids]  # [2, d]
        answer = self._normed(hidden) @ rows.T
        if self.lm_head.bias is not None:
            answer = answer + self.lm_head.bias[ids]
        answer = answer.float()
        return answer[..., 0] - answer[..., 1]

    def log_probs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(score, logp_yes, logp_no)``, each ``[...]`` float32, log-softmax over the full vocabulary."""
        logp = torch.log_softmax(self.logits(hidden), dim=-1)
        return self.score(hidden), logp[..., self.yes_id], logp[..., self.no_id]
