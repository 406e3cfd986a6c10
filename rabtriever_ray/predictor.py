"""Rabtriever's trainable predictor: the query embedding, conditioned on the document, mapped onto the
teacher's contextual query embedding (JEPA, with the document as the latent).

``predicted = h_q + MLP([h_q; h_d; h_q * h_d])``: a two-layer MLP whose last layer is zero-initialised, so an
untrained predictor returns ``h_q`` exactly and the student starts as the teacher reading an empty document.
"""

from __future__ import annotations

import torch
from torch import nn


class Predictor(nn.Module):
    """Residual MLP over ``[h_q; h_d; h_q*h_d]``.

    Args:
        hidden_size: the backbone's hidden size ``d``.
        predictor_hidden: width of the MLP's hidden layer.
        input_norm: LayerNorm ``h_q`` and ``h_d`` before the MLP. Pre-norm hidden states of LLMs have a few
            dimensions orders of magnitude larger than the rest; normalising keeps them from swamping the MLP.
    """

    def __init__(self, hidden_size: int, predictor_hidden: int = 1024, input_norm: bool = True):
        super().__init__()
        self.norm_query = nn.LayerNorm(hidden_size) if input_norm else nn.Identity()
        self.norm_doc = nn.LayerNorm(hidden_size) if input_norm else nn.Identity()
        self.fc_in = nn.Linear(3 * hidden_size, predictor_hidden)
        self.act = nn.GELU()
        self.fc_out = nn.Linear(predictor_hidden, hidden_size)
        nn.init.zeros_(self.fc_out.weight)
        nn.init.zeros_(self.fc_out.bias)

    def forward(self, h_query: torch.Tensor, h_doc: torch.Tensor) -> torch.Tensor:
        """``h_query``, ``h_doc``: ``[..., d]`` (broadcastable) -> predicted query embedding ``[..., d]``."""
        h_query, h_doc = torch.broadcast_tensors(h_query, h_doc)
        q = self.norm_query(h_query)
        d = self.norm_doc(h_doc)
        return h_query + self.fc_out(self.act(self.fc_in(torch.cat([q, d, q * d], dim=-1))))


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
