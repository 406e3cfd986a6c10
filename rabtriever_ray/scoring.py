"""The one scoring function: how a pre-norm hidden state at the answer position becomes a relevance score.

Teacher, student, the distillation losses, serving and teacher fine-tuning all score through `YesNoHead`, so they
cannot disagree. It reproduces the model's own next-token logits, family post-processing included
(`families.logit_transform`: Gemma's soft-cap, Cohere's and Granite's scaling)::

    logits = transform(lm_head(final_norm(hidden)))       # [n, vocab]
    score  = logp_yes - logp_no = logit_yes - logit_no    # "logit_difference": the normaliser cancels
    score  = logit_yes                                    # "yes_logit" (bge-reranker-v2-gemma)

The score rule is the prompt preset's (`presets`): every reader of a score (teacher, student, losses, evaluation,
serving) gets it from this one head.

Everything here runs in float32 whatever the backbone's dtype: with a bf16 model a score would otherwise be the
difference of two bf16-rounded logits (steps of 0.06-0.125 at logits of 10-30), which ties candidates and rounds
away the predictor's small corrections. `score` reads only the two answer rows of the LM head (cheap enough to
score millions of pairs); `logits` computes the full vocabulary (for the reverse KL and log-probabilities) in
float32 chunks of the vocabulary, so a bf16 head never needs a whole float32 copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .families import UnsupportedModelError, backbone, final_norm, logit_transform
from .presets import ScoreRule

VOCAB_CHUNK = 32768  # rows of a non-float32 LM head cast to float32 at a time


def _float32_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` computed in float32 (its parameters cast for the call; gradients still reach them)."""
    if all(p.dtype == torch.float32 for p in module.parameters()):
        return module(x)
    params = {name: p.float() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


class YesNoHead(nn.Module):
    """Frozen final norm + LM head of a causal LM (shared, not copied), reading the yes/no answer tokens.

    Args:
        model: the causal LM (any family in `families.SUPPORTED`).
        yes_id, no_id: the answer token ids (`PromptBuilder.yes_id` / ``no_id``).
        rule: the score rule (`presets.ScoreRule`, `PromptBuilder.score_rule`).
    """

    def __init__(self, model: nn.Module, yes_id: int, no_id: int, rule: ScoreRule = "logit_difference"):
        super().__init__()
        if rule not in ("logit_difference", "yes_logit"):
            raise ValueError(f"unknown score rule {rule!r}")
        self.rule = rule
        self.norm = final_norm(model)
        self.lm_head = model.get_output_embeddings()
        self.transform = logit_transform(model)
        self.yes_id = int(yes_id)
        self.no_id = int(no_id)

    def normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` pre-norm hidden states -> the final norm's output, float32, on the head's device."""
        weight = self.lm_head.weight
        with torch.autocast(weight.device.type, enabled=False):
            return _float32_call(self.norm, hidden.to(device=weight.device, dtype=torch.float32))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` pre-norm hidden states -> ``[..., vocab]`` float32 logits, as the model computes them."""
        x = self.normed(hidden)
        weight, bias = self.lm_head.weight, self.lm_head.bias
        with torch.autocast(weight.device.type, enabled=False):
            if weight.dtype == torch.float32:
                out = F.linear(x, weight, bias)
            else:
                out = torch.cat(
                    [
                        F.linear(
                            x,
                            weight[i : i + VOCAB_CHUNK].float(),
                            None if bias is None else bias[i : i + VOCAB_CHUNK].float(),
                        )
                        for i in range(0, weight.shape[0], VOCAB_CHUNK)
                    ],
                    dim=-1,
                )
            return self.transform(out)

    def answer_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` -> ``[..., 2]`` float32 logits of the "yes" and "no" tokens (two LM-head rows only)."""
        x = self.normed(hidden)
        ids = torch.tensor([self.yes_id, self.no_id], device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            answer = x @ self.lm_head.weight[ids].float().T
            if self.lm_head.bias is not None:
                answer = answer + self.lm_head.bias[ids].float()
            return self.transform(answer)

    def score(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., d]`` pre-norm hidden states -> ``[...]`` float32 scores by the rule: ``logit_yes - logit_no``
        or ``logit_yes``."""
        answer = self.answer_logits(hidden)
        return answer[..., 0] - answer[..., 1] if self.rule == "logit_difference" else answer[..., 0]

    def log_probs(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(score, logp_yes, logp_no)``, each ``[...]`` float32, log-softmax over the full vocabulary."""
        logp = torch.log_softmax(self.logits(hidden), dim=-1)
        return self.score(hidden), logp[..., self.yes_id], logp[..., self.no_id]


def check_output_head(model: nn.Module, tokens: int = 8) -> float:
    """Check that `YesNoHead` reproduces ``model``'s own logits on a short fixed sequence; returns the largest
    difference, or raises `UnsupportedModelError` naming the model type.

    The tolerance follows the model's dtype: the head runs in float32, the model in its own precision.
    """
    from .backbone import capture_pre_norm

    param = next(model.parameters())
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = (torch.arange(tokens, device=param.device) * 7919 % min(vocab, 1000))[None] + 1
    head = YesNoHead(model, 0, 1)
    with capture_pre_norm(model) as captured, torch.inference_mode():
        own = model(input_ids=ids, use_cache=False).logits[0].float()
        mine = head.logits(captured[-1][0])
    scale = float(own.abs().max()) + 1.0
    tolerance = (1e-4 if param.dtype == torch.float32 else 3e-2) * scale
    difference = float((own - mine).abs().max())
    if not difference <= tolerance:
        raise UnsupportedModelError(
            f"the output head of model type {model.config.model_type!r} ({type(model).__name__}, decoder "
            f"{type(backbone(model)).__name__}) does not reproduce the model's own logits (largest difference "
            f"{difference:.3g} > {tolerance:.3g}): scores would not be the model's yes/no probabilities"
        )
    return difference
