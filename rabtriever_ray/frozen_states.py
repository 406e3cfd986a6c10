"""Teacher fine-tuning with the frozen lower blocks run once.

With ``train_layers`` only the top decoder blocks train. The embeddings and the blocks below them see the same
tokens in every epoch and give the same states, so `FrozenStates` keeps them: a pair's first forward records the
input of the lowest trained block at the pair's real tokens, and a later batch whose pairs are all recorded runs
with every lower block replaced by a pass-through while the lowest trained block receives the recorded states.
An epoch after the first then costs the trained blocks alone, forward and backward. The results equal the full
forward up to float rounding on every supported family (``tests/test_frozen_states.py``).

It stays off where the frozen part is not a fixed function of the tokens: `check` runs the lower blocks twice on
the first batch and switches the cache off when the two differ (dropout in training mode). Pairs past
``max_bytes`` are not recorded, and a batch holding one of them runs in full.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Hashable, Sequence

import torch
from torch import nn

from .families import decoder_layers

logger = logging.getLogger(__name__)


class _PassThrough(nn.Module):
    """Stands in for a frozen block: returns its input hidden states as the block would return its output (a
    tensor, or a tuple of ``tuple_len`` whose first item is the states, as older transformers' blocks do).
    Attributes the decoder reads from its blocks (an attention type) come from the block it replaces."""

    def __init__(self, block: nn.Module, tuple_len: int):
        super().__init__()
        self.block = block
        self.tuple_len = tuple_len

    def forward(self, hidden_states, *args, **kwargs):
        if self.tuple_len:
            return (hidden_states,) + (None,) * (self.tuple_len - 1)
        return hidden_states

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def _replace_hidden_states(args: tuple, kwargs: dict, states: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (states, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": states}


def _hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class FrozenStates:
    """The recorded input states of the lowest trained block, per pair key, in host memory (a GPU's memory stays
    the model's; a replayed batch's states are copied to it).

    Args:
        model: the causal LM being fine-tuned (its blocks below ``first`` frozen).
        first: index of the lowest trained block; 0 turns the cache off (every block trains).
        padding_side: how batches are padded (`backbone.pad_batch`): where each row's real tokens stand.
        max_bytes: states kept at most; pairs past it are not recorded.
    """

    def __init__(self, model: nn.Module, first: int, padding_side: str, max_bytes: int):
        self.blocks = decoder_layers(model)
        self.first = first
        self.padding_side = padding_side
        self.max_bytes = max_bytes
        self.enabled = first > 0 and max_bytes > 0
        self.states: dict[Hashable, torch.Tensor] = {}
        self.bytes = 0
        self.tuple_len = 0
        self.counts = {"replayed": 0, "run": 0}  # batches

    def _spans(self, attention_mask: torch.Tensor) -> list[slice]:
        """Each row's real tokens: the columns `backbone.pad_batch` put them in."""
        width = attention_mask.shape[1]
        lengths = attention_mask.sum(-1).tolist()
        if self.padding_side == "left":
            return [slice(width - n, width) for n in lengths]
        return [slice(0, n) for n in lengths]

    @contextlib.contextmanager
    def _recording(self):
        """Yield a list that receives the lowest trained block's input states of the forward run inside."""
        captured: list[torch.Tensor] = []

        def before(_module, args, kwargs):
            captured.append(_hidden_states_of(args, kwargs).detach())

        def after(_module, _args, output):
            self.tuple_len = len(output) if isinstance(output, tuple) else 0

        handles = [
            self.blocks[self.first].register_forward_pre_hook(before, with_kwargs=True),
            self.blocks[self.first - 1].register_forward_hook(after),
        ]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    @contextlib.contextmanager
    def _replaying(self, states: torch.Tensor):
        """The forward run inside skips the lower blocks and starts the lowest trained one from ``states``."""
        originals = [self.blocks[i] for i in range(self.first)]
        handle = self.blocks[self.first].register_forward_pre_hook(
            lambda _module, args, kwargs: _replace_hidden_states(args, kwargs, states), with_kwargs=True
        )
        try:
            for i, block in enumerate(originals):
                self.blocks[i] = _PassThrough(block, self.tuple_len)
            yield
        finally:
            for i, block in enumerate(originals):
                self.blocks[i] = block
            handle.remove()

    def check(self, forward: Callable[[], object]) -> bool:
        """Run ``forward`` (one batch, no gradients needed) twice and keep the cache on only if the lowest trained
        block received the same states both times. Returns whether the cache is on."""
        if not self.enabled:
            return False
        with torch.no_grad():
            with self._recording() as first:
                forward()
            with self._recording() as second:
                forward()
        if not (first and second and torch.allclose(first[0], second[0], rtol=1e-4, atol=1e-5)):
            self.enabled = False
            logger.info("the frozen lower blocks are not deterministic (dropout?): they run in every epoch")
        return self.enabled

    @contextlib.contextmanager
    def applied(self, keys: Sequence[Hashable], attention_mask: torch.Tensor):
        """Around one batch's forward (rows keyed by ``keys``, padded as ``attention_mask`` says): replayed from
        the recorded states when every row has them, else run in full and its rows recorded within the budget."""
        if not self.enabled:
            yield
            return
        if all(key in self.states for key in keys):
            recorded = [self.states[key] for key in keys]
            width, rows = attention_mask.shape[1], len(keys)
            states = recorded[0].new_zeros((rows, width, recorded[0].shape[-1]))  # in host memory
            for row, (tensor, span) in enumerate(zip(recorded, self._spans(attention_mask), strict=True)):
                states[row, span] = tensor
            self.counts["replayed"] += 1
            with self._replaying(states.to(attention_mask.device)):
                yield
            return
        self.counts["run"] += 1
        with self._recording() as captured:
            yield
        if not captured:
            return
        rows = [captured[0][row, span] for row, span in enumerate(self._spans(attention_mask))]
        for key, tensor in zip(keys, rows, strict=True):
            size = tensor.numel() * tensor.element_size()
            if key not in self.states and self.bytes + size <= self.max_bytes:
                self.states[key] = tensor.to("cpu", copy=True)
                self.bytes += size
