"""Distillation building blocks: the embedding cache and the explicit loss step.

The step (`distill_losses`) takes the frozen embeddings of a batch of (query, document) pairs and the teacher's
outputs for them, and returns every loss term::

    predicted      = predictor(h_q, h_d)
    jepa           = jepa_loss(predicted, teacher_hidden)
    rkl            = reverse_kl(lm_head(norm(predicted)), lm_head(norm(teacher_hidden)), T)
    list           = listwise_kl(scale * q_proj(h_q) . d_proj(h_d), teacher_score, T)   per query in the batch
    rank           = listwise_kl(student_score, teacher_score, T)                         per query in the batch
    total          = w_jepa * jepa + w_rkl * rkl + w_list * list + w_rank * rank

Only the hidden state travels from the teacher; its logits are recomputed here with the frozen head.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .config import LossConfig
from .losses import jepa_loss, listwise_kl, reverse_kl
from .student import Rabtriever


class EmbeddingCache:
    """Frozen-backbone embeddings keyed by text, so each unique text is encoded once per run.

    Args:
        encode: texts -> ``[n, d]`` embeddings (e.g. `Rabtriever.encode_queries`).
    """

    def __init__(self, encode: Callable[[Sequence[str]], torch.Tensor]):
        self._encode = encode
        self._rows: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), d]`` embeddings; texts not seen before are encoded together in one call."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._rows))
        if missing:
            for text, row in zip(missing, self._encode(missing), strict=True):
                self._rows[text] = row
        return torch.stack([self._rows[t] for t in texts])


def group_by_query(query_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each query's pairs in a batch: ``index`` ``[B, N]`` (long) and ``mask`` ``[B, N]`` (bool).

    ``B`` is the number of distinct queries (in order of first appearance), ``N`` the most pairs any of them has;
    padding entries point at position 0 and are False in the mask.
    """
    groups: dict[str, list[int]] = {}
    for position, qid in enumerate(query_ids):
        groups.setdefault(qid, []).append(position)
    width = max((len(g) for g in groups.values()), default=0)
    index = torch.zeros((len(groups), width), dtype=torch.long)
    mask = torch.zeros((len(groups), width), dtype=torch.bool)
    for row, positions in enumerate(groups.values()):
        index[row, : len(positions)] = torch.tensor(positions)
        mask[row, : len(positions)] = True
    return index, mask


def distill_losses(
    student: Rabtriever,
    h_query: torch.Tensor,
    h_doc: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_score: torch.Tensor,
    query_ids: Sequence[str],
    loss: LossConfig,
) -> dict[str, torch.Tensor]:
    """Every loss term and their weighted ``total`` for a batch of ``n`` pairs (see the module docstring).

    Args:
        student: the (possibly DDP-unwrapped) Rabtriever.
        h_query, h_doc: ``[n, d]`` frozen embeddings of each pair's query and document.
        teacher_hidden: ``[n, d]`` teacher hidden states; teacher_score: ``[n]`` teacher scores.
        query_ids: ``n`` query ids; the listwise terms compare the candidates of each query within the batch.
    """
    device = student.q_proj.weight.device
    teacher_hidden = teacher_hidden.to(device=device, dtype=torch.float32)
    teacher_score = teacher_score.to(device=device, dtype=torch.float32)
    predicted = student.predict(h_query, h_doc)
    zero = predicted.new_zeros(())
    terms: dict[str, torch.Tensor] = {}
    terms["jepa"] = jepa_loss(predicted, teacher_hidden, loss.jepa_kind) if loss.w_jepa else zero
    if loss.w_rkl:
        with torch.no_grad():
            teacher_logits = student.head.logits(teacher_hidden)
        terms["rkl"] = reverse_kl(student.head.logits(predicted), teacher_logits, loss.temperature)
    else:
        terms["rkl"] = zero
    index, mask = group_by_query(query_ids)
    index, mask = index.to(device), mask.to(device)
    teacher_lists = teacher_score[index]
    if loss.w_list:
        first_stage = (student.embed_queries(h_query) * student.embed_documents(h_doc)).sum(-1)
        first_stage = first_stage * student.first_stage_scale.exp()
        terms["list"] = listwise_kl(first_stage[index], teacher_lists, loss.temperature, mask)
    else:
        terms["list"] = zero
    if loss.w_rank:
        terms["rank"] = listwise_kl(
            student.head.score(predicted)[index], teacher_lists, loss.temperature, mask
        )
    else:
        terms["rank"] = zero
    terms["total"] = (
        loss.w_jepa * terms["jepa"]
        + loss.w_rkl * terms["rkl"]
        + loss.w_list * terms["list"]
        + loss.w_rank * terms["rank"]
    )
    return terms
