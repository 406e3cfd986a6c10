"""Distillation losses: pure functions of student and teacher tensors, temperature passed explicitly.

- `jepa_loss`: distance between the predicted and the teacher's contextual query embedding.
- `reverse_kl`: KL(p_student || p_teacher) between LM-head distributions over the full vocabulary
  (mode-seeking: the student is penalised for mass where the teacher has none).
- `forward_kl`: KL(p_teacher || p_student), for comparison.
- `listwise_kl`: KL(softmax(teacher/T) || softmax(student/T)) over each query's candidate list, with a padding
  mask.

Teacher fine-tuning (`finetune_loop.py`) trains the reranker itself on labelled groups:

- `listwise_ce`: softmax cross-entropy of each group's scores with the positive in column 0.
- `answer_ce`: cross-entropy of the yes/no answer token (the positive should say "yes", negatives "no").

Each returns the mean over rows (queries or pairs) as a scalar. KL terms are not multiplied by T^2; scale the
loss weight instead if you change the temperature a lot.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs are computed in float32; float32 and float64 are kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def jepa_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: Literal["mse", "smooth_l1", "cosine"] = "mse",
    beta: float = 1.0,
) -> torch.Tensor:
    """``pred``, ``target``: ``[n, d]``. mse / smooth_l1: mean over all elements; cosine: mean of ``1 - cos``."""
    if pred.shape != target.shape:
        raise ValueError(
            f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape"
        )
    pred, target = _upcast(pred), _upcast(target)
    if kind == "mse":
        return F.mse_loss(pred, target)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, target, beta=beta)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()
    raise ValueError(f"unknown jepa loss kind {kind!r}; expected mse, smooth_l1 or cosine")


def _kl_rows(logp_from: torch.Tensor, logp_to: torch.Tensor) -> torch.Tensor:
    """Per-row KL(p_from || p_to) for log-probabilities ``[rows, V]``; zero-probability terms contribute 0."""
    p_from = logp_from.exp()
    # Mask the log-ratio, not the product, so -inf - -inf never reaches the forward or backward pass.
    log_ratio = torch.where(p_from > 0, logp_from - logp_to, torch.zeros_like(logp_from))
    return (p_from * log_ratio).sum(-1)


def _vocab_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    reverse: bool,
    chunk_rows: int,
) -> torch.Tensor:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits differ in shape"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    vocab = student_logits.shape[-1]
    student_logits = student_logits.reshape(-1, vocab)
    teacher_logits = teacher_logits.reshape(-1, vocab)
    total = _upcast(student_logits).new_zeros(())
    # Row chunks bound the [rows, V] float32 temporaries for large vocabularies.
    for start in range(0, student_logits.shape[0], chunk_rows):
        s = torch.log_softmax(_upcast(student_logits[start : start + chunk_rows]) / temperature, dim=-1)
        t = torch.log_softmax(_upcast(teacher_logits[start : start + chunk_rows]) / temperature, dim=-1)
        total = total + (_kl_rows(s, t) if reverse else _kl_rows(t, s)).sum()
    return total / max(student_logits.shape[0], 1)


def reverse_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, chunk_rows: int = 64
) -> torch.Tensor:
    """KL(p_student || p_teacher) over the last dim ``[..., V]``, exact, mean over rows."""
    return _vocab_kl(student_logits, teacher_logits, temperature, reverse=True, chunk_rows=chunk_rows)


def forward_kl(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0, chunk_rows: int = 64
) -> torch.Tensor:
    """KL(p_teacher || p_student) over the last dim ``[..., V]``, exact, mean over rows."""
    return _vocab_kl(student_logits, teacher_logits, temperature, reverse=False, chunk_rows=chunk_rows)


def listwise_kl(
    student_scores: torch.Tensor,
    teacher_scores: torch.Tensor,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(student/T)) per candidate list, mean over lists.

    Args:
        student_scores, teacher_scores: ``[B, N]`` scores of ``N`` candidates for each of ``B`` queries.
        mask: ``[B, N]`` bool, True for real candidates; padding is excluded from both softmaxes. Lists with
            fewer than two real candidates carry no ranking signal and are left out of the mean.
    """
    if student_scores.shape != teacher_scores.shape:
        raise ValueError(
            f"student {tuple(student_scores.shape)} and teacher {tuple(teacher_scores.shape)} scores differ in shape"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if mask is None:
        mask = torch.ones_like(student_scores, dtype=torch.bool)
    mask = mask.bool()
    keep = mask.sum(-1) >= 2
    if not keep.any():
        return student_scores.sum() * 0.0
    student_scores, teacher_scores = _upcast(student_scores), _upcast(teacher_scores)
    # A finite fill keeps padding out of both softmaxes without producing inf - inf.
    s = torch.log_softmax(
        (student_scores / temperature).masked_fill(~mask, torch.finfo(student_scores.dtype).min), dim=-1
    )
    t = torch.log_softmax(
        (teacher_scores / temperature).masked_fill(~mask, torch.finfo(teacher_scores.dtype).min), dim=-1
    )
    terms = t.exp() * (t - s)
    terms = torch.where(mask, terms, torch.zeros_like(terms))
    return terms.sum(-1)[keep].mean()


def listwise_ce(
    scores: torch.Tensor, temperature: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax cross-entropy per group with the positive in column 0, mean over groups.

    Args:
        scores: ``[B, N]`` scores of each group's positive (column 0) and ``N - 1`` negatives.
        mask: ``[B, N]`` bool, True for real candidates; padding is left out of the softmax.
    """
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"scores must be [groups, 1 + negatives] with at least one negative, got {tuple(scores.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scores = _upcast(scores) / temperature
    if mask is not None:
        scores = scores.masked_fill(~mask.bool(), torch.finfo(scores.dtype).min)
    return -torch.log_softmax(scores, dim=-1)[:, 0].mean()


def answer_ce(logp_yes: torch.Tensor, logp_no: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the answer token: ``-logp_yes`` where ``labels`` is 1, ``-logp_no`` where 0.

    ``logp_yes``, ``logp_no``: ``[n]`` log-probabilities over the full vocabulary; ``labels``: ``[n]`` 0/1.
    """
    labels = labels.bool()
    return -torch.where(labels, _upcast(logp_yes), _upcast(logp_no)).mean()


class NonFiniteLoss(FloatingPointError):
    """A loss term that is NaN or infinite: training on it would spread NaN into every parameter."""


def check_finite(terms: dict[str, torch.Tensor], where: str) -> None:
    """Raise `NonFiniteLoss` naming ``where`` (the batch) and the first term of ``terms`` that is NaN or inf."""
    for name, value in terms.items():
        if not torch.isfinite(value.detach()).all():
            finite = {k: round(float(v.detach()), 4) for k, v in terms.items() if torch.isfinite(v.detach()).all()}
            raise NonFiniteLoss(
                f"{where}: loss term {name!r} is {float(value.detach())} (finite terms: {finite}); stopped before "
                "training on it: check the teacher scores this batch came from, or lower the learning rate"
            )
