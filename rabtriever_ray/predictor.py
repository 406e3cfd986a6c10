"""Rabtriever's trainable predictor: the query embedding, conditioned on the document, mapped onto the
teacher's contextual query embedding (JEPA, with the document as the latent).

``predicted = h_q + MLP([q; h_d; q * h_d])``: a two-layer MLP whose last layer is zero-initialised, so an
untrained predictor returns ``h_q`` exactly and the student starts as the teacher reading an empty document.
``h_q`` is the pre-norm state at the answer position of the query prompt. With ``query_mean`` the query
embedding also carries the mean pre-norm state over the query's own tokens, ``[h_q; m_q]`` (``2d`` wide), and
the MLP reads ``q`` = ``m_q`` standardised per dimension; otherwise ``q`` is ``h_q`` itself. The answer position
of a prompt with an empty document slot says little about the query (a linear probe on it tells the demo's
queries apart half as well as one on ``m_q``; `benchmarks/query_probe.py`).
"""

from __future__ import annotations

import torch
from torch import nn


class RunningStandardize(nn.Module):
    """Per-dimension standardisation by the mean and variance of every batch given to `update`.

    The statistics accumulate over all training batches (not a moving average), so they settle on the training
    distribution; only the training forward (`Rabtriever.forward`) updates them, so scoring never changes them,
    in either mode. They are buffers, saved with the checkpoint. Pre-norm states of
    LLMs have a few dimensions orders of magnitude larger than the rest; a LayerNorm over the vector still lets
    those swamp the others, a per-dimension scale does not.
    """

    def __init__(self, size: int, eps: float = 1e-4):
        super().__init__()
        self.eps = eps
        # Shape [1], not 0-d: DeepSpeed broadcasts buffers as byte views, which 0-d tensors cannot take.
        self.register_buffer("count", torch.zeros(1, dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))
        self.register_buffer("m2", torch.zeros(size, dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the rows of ``x`` ``[..., size]`` into the running statistics (Chan et al.'s pairwise update)."""
        rows = x.reshape(-1, x.shape[-1]).double()
        n = rows.shape[0]
        if n == 0:
            return
        batch_mean = rows.mean(0)
        batch_m2 = ((rows - batch_mean) ** 2).sum(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total)
        self.m2 += batch_m2 + delta**2 * (self.count * n / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = self.m2 / self.count.clamp(min=1)
        scale = (variance + self.eps).rsqrt()
        standardised = (x - self.mean.to(x.dtype)) * scale.to(x.dtype)
        # Nothing seen yet: the identity. Chosen on the device, without reading the count back (a sync per call).
        return torch.where(self.count.to(x.device) > 0, standardised, x)


class Predictor(nn.Module):
    """Residual MLP over ``[q; h_d; q*h_d]``.

    Args:
        hidden_size: the backbone's hidden size ``d``.
        predictor_hidden: width of the MLP's hidden layer.
        input_norm: LayerNorm ``h_q`` and ``h_d`` before the MLP. Pre-norm hidden states of LLMs have a few
            dimensions orders of magnitude larger than the rest; normalising keeps them from swamping the MLP.
        query_mean: the query embedding is ``[h_q; m_q]`` (``2d``); the MLP reads ``m_q`` through a
            `RunningStandardize` and the residual stays ``h_q``.
        dropout: dropout on the MLP's hidden layer while training (a regulariser for few training queries).
    """

    def __init__(
        self,
        hidden_size: int,
        predictor_hidden: int = 1024,
        input_norm: bool = True,
        query_mean: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        if query_mean:
            self.norm_query = RunningStandardize(hidden_size)
        else:
            self.norm_query = nn.LayerNorm(hidden_size) if input_norm else nn.Identity()
        self.query_mean = query_mean
        self.norm_doc = nn.LayerNorm(hidden_size) if input_norm else nn.Identity()
        self.fc_in = nn.Linear(3 * hidden_size, predictor_hidden)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout)  # on the hidden layer, in training only
        self.fc_out = nn.Linear(predictor_hidden, hidden_size)
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)

    def observe(self, h_query: torch.Tensor) -> None:
        """Update the query standardisation's statistics with a training batch ``[n, 2d]`` (no-op without
        ``query_mean``)."""
        if self.query_mean:
            self.norm_query.update(h_query[..., self.hidden_size :])

    def query_parts(self, h_query: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h_q, q)``: the residual base ``[..., d]`` and the MLP's query input ``[..., d]``."""
        if self.query_mean:
            last, mean = h_query.split(self.hidden_size, dim=-1)
            return last, self.norm_query(mean)
        return h_query, self.norm_query(h_query)

    def forward(self, h_query: torch.Tensor, h_doc: torch.Tensor) -> torch.Tensor:
        """``h_query`` ``[..., d]`` (``[..., 2d]`` with ``query_mean``), ``h_doc`` ``[..., d]`` (broadcastable)
        -> predicted query embedding ``[..., d]``."""
        base, q = self.query_parts(h_query)
        base, q, h_doc = torch.broadcast_tensors(base, q, h_doc)
        d = self.norm_doc(h_doc)
        return base + self.fc_out(self.dropout(self.act(self.fc_in(torch.cat([q, d, q * d], dim=-1)))))


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
