"""Running a causal LM's backbone: batching, padding, and the capture of the pre-norm hidden state.

`last_token_hidden` is the one forward pass every component uses: it returns the final-layer hidden state at the
last token of each sequence, *before* the final norm, so that ``lm_head(final_norm(hidden))`` gives the logits,
and on request the mean of those states over a span of each sequence (the student's query tokens).
`pre_norm_hidden_at` is its step on one padded batch, with gradients when the caller allows them (teacher
fine-tuning); `shared_prefix_last_hidden` gives the same states while running each shared prefix once.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import MutableMapping, Sequence

import torch
from torch import nn

from .families import backbone, final_norm, text_config


def token_batches(
    lengths: Sequence[int],
    max_batch_tokens: int,
    max_padding: float = 0.1,
    prefix_lengths: Sequence[int] | None = None,
) -> list[list[int]]:
    """Group sequence indices into batches, longest first, with rows x width <= max_batch_tokens.

    The width of a batch is its longest sequence; with ``prefix_lengths`` (tails that continue a cached prefix,
    see `shared_prefix_last_hidden`) it is the longest prefix plus the longest tail, since every row carries the
    keys and values of the batch's longest prefix. A batch also closes when the next sequence is more than
    ``max_padding`` (a fraction) shorter than the batch's longest, so no row carries more than that share of
    padding: on CPUs the forward cost is linear in padded tokens and bigger batches buy little. A sequence wider
    than the budget gets a batch of its own.
    """
    prefix = prefix_lengths if prefix_lengths is not None else [0] * len(lengths)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], -prefix[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    longest_prefix = 0
    for index in order:
        if current:
            longest = lengths[current[0]]
            width = longest + max(longest_prefix, prefix[index])
            too_big = width * (len(current) + 1) > max_batch_tokens
            too_short = lengths[index] < longest * (1.0 - max_padding)
            if too_big or too_short:
                batches.append(current)
                current, longest_prefix = [], 0
        current.append(index)
        longest_prefix = max(longest_prefix, prefix[index])
    if current:
        batches.append(current)
    return batches


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int, padding_side: str, device: torch.device):
    """Pad token id lists into ``(input_ids, attention_mask, position_ids)``, each ``[rows, longest]``.

    Positions count real tokens only, so left padding does not shift RoPE positions: the result for a sequence
    does not depend on what it was batched with.
    """
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if not seq:
            raise ValueError("cannot encode an empty token sequence")
        span = slice(longest - len(seq), longest) if padding_side == "left" else slice(0, len(seq))
        input_ids[row, span] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[row, span] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return input_ids.to(device), attention_mask.to(device), position_ids.to(device)


def last_token_hidden(
    model: nn.Module,
    sequences: Sequence[Sequence[int]],
    pad_id: int,
    padding_side: str = "right",
    max_batch_tokens: int = 16384,
    stats: dict[str, int] | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """Pre-final-norm hidden state at the last real token of each sequence: ``[len(sequences), hidden]`` float32.

    With ``spans`` (a ``(start, end)`` token range per sequence) each row is ``[last; mean]``, ``[n, 2 * hidden]``:
    the last token's state and the mean state over the span, from the same forward (`span_mean`).
    Batches are formed by `token_batches` and padded on ``padding_side``; results come back in input order.
    The forward runs under ``torch.inference_mode``; the returned tensor is an ordinary tensor, usable as an
    input or target of trainable modules. ``stats``, when given, accumulates ``tokens`` (real), ``padded_tokens``
    (rows x longest, what the forward computed) and ``forwards``.
    """
    device = next(model.parameters()).device
    width = text_config(model.config).hidden_size * (2 if spans is not None else 1)
    out = torch.empty((len(sequences), width), dtype=torch.float32)  # outside inference mode
    with torch.inference_mode():
        for batch in token_batches([len(s) for s in sequences], max_batch_tokens):
            input_ids, attention_mask, position_ids = pad_batch(
                [sequences[i] for i in batch], pad_id, padding_side, device
            )
            _count(stats, attention_mask)
            last = last_positions(attention_mask, padding_side)
            if spans is None:
                rows = pre_norm_hidden_at(model, input_ids, attention_mask, position_ids, last)
            else:
                # Left padding moves a sequence's tokens right by its padding.
                shift = [input_ids.shape[1] - len(sequences[i]) if padding_side == "left" else 0 for i in batch]
                columns = [(spans[i][0] + s, spans[i][1] + s) for i, s in zip(batch, shift, strict=True)]
                rows = span_mean(pre_norm_states(model, input_ids, attention_mask, position_ids), last, columns)
            out[torch.as_tensor(batch)] = rows.float().cpu()
    return out


def span_mean(states: torch.Tensor, last: torch.Tensor, columns: Sequence[tuple[int, int]]) -> torch.Tensor:
    """``[last; mean]`` per row of ``states`` ``[rows, length, d]``: the state at column ``last[row]`` and the mean
    state over columns ``[start, end)`` of ``columns[row]`` (the last state again where a span is empty), ``[rows, 2d]``
    float32."""
    rows, length, _ = states.shape
    last_state = states[torch.arange(rows, device=states.device), last].float()
    bounds = torch.tensor(columns, dtype=torch.long, device=states.device).reshape(rows, 2)
    position = torch.arange(length, device=states.device)
    weights = ((position >= bounds[:, :1]) & (position < bounds[:, 1:])).float()
    counts = weights.sum(-1, keepdim=True)
    mean = torch.bmm((weights / counts.clamp(min=1))[:, None, :], states.float())[:, 0]
    return torch.cat([last_state, torch.where(counts > 0, mean, last_state)], -1)


def last_positions(attention_mask: torch.Tensor, padding_side: str) -> torch.Tensor:
    """``[rows]`` (long): the column of each row's last real token in a batch padded by `pad_batch`."""
    # Left padding puts every last token in the final column; right padding at length - 1.
    if padding_side == "left":
        return torch.full((len(attention_mask),), attention_mask.shape[1] - 1, device=attention_mask.device)
    return attention_mask.sum(-1) - 1


def pre_norm_hidden_at(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    last: torch.Tensor,
) -> torch.Tensor:
    """One backbone forward of a padded batch (`pad_batch`): the pre-final-norm hidden state at column ``last``
    of each row (`last_positions`), ``[rows, hidden]`` in the model's dtype.

    Differentiable when gradients are enabled (teacher fine-tuning); `last_token_hidden` calls it under
    ``torch.inference_mode``.
    """
    states = pre_norm_states(model, input_ids, attention_mask, position_ids)
    return states[torch.arange(len(last), device=last.device), last]


def pre_norm_states(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """Pre-final-norm hidden states of every position of a padded batch, ``[rows, length, hidden]``."""
    with capture_pre_norm(model) as captured:
        backbone(model)(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        )
    return captured[-1]


def shared_prefix_last_hidden(
    model: nn.Module,
    prefixes: Sequence[Sequence[int]],
    tails: Sequence[Sequence[int]],
    prefix_of: Sequence[int],
    pad_id: int,
    max_batch_tokens: int = 16384,
    stats: dict[str, int] | None = None,
    kv_cache: MutableMapping[tuple[int, ...], torch.Tensor] | None = None,
    keep: Sequence[bool] | None = None,
    spans: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:
    """`last_token_hidden` of ``prefixes[prefix_of[i]] + tails[i]``, running each shared prefix only once.
    ``spans`` (token ranges of the full sequences, inside their tails) as in `last_token_hidden`.

    ``kv_cache`` (keyed by a prefix's token ids) supplies prefixes computed by an earlier call, and receives
    those marked in ``keep``; it must only be reused with the same, unchanged model.

    Each prefix's keys and values are computed once, every layer keeping all of them (a sliding-window layer's
    own cache would keep only the window). Tails are then batched across prefixes (`token_batches`, counting the
    longest prefix and the longest tail of a batch against ``max_batch_tokens``): a batch's cache holds each
    row's prefix keys/values left-padded to the batch's longest prefix (masked out), and its tail tokens continue
    at positions after its own prefix. Left padding shifts a row's cache indices and its queries' cache positions
    by the same amount, so the model's causal and sliding-window masks, computed on those indices, see exactly
    the tokens they would see in the full sequence. This saves the prefixes' share of the compute, e.g. template
    + document for every pair that shares a document.
    Returns ``[len(tails), hidden]`` float32, equal to the full-sequence result up to float rounding.
    """
    from transformers import DynamicCache

    device = next(model.parameters()).device
    width = text_config(model.config).hidden_size * (2 if spans is not None else 1)
    out = torch.empty((len(tails), width), dtype=torch.float32)
    decoder = backbone(model)
    cache_arg = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    with capture_pre_norm(model) as captured, torch.inference_mode():
        # Per prefix: keys and values of every layer, stacked as [layers, 2, kv_heads, length, head_dim].
        prefix_kv = []
        for number, prefix in enumerate(prefixes):
            key = tuple(prefix)
            if kv_cache is not None and key in kv_cache:
                prefix_kv.append(kv_cache[key])
                continue
            cache = DynamicCache()  # no config: every layer a full cache, none cut to a sliding window
            decoder(
                input_ids=torch.tensor([list(prefix)], device=device), use_cache=True, **{cache_arg: cache}
            )
            _count(stats, torch.ones((1, len(prefix))))
            prefix_kv.append(
                torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
            )
            if kv_cache is not None and keep is not None and keep[number]:
                kv_cache[key] = prefix_kv[-1]
        prefix_lengths = [len(prefixes[p]) for p in prefix_of]
        if spans is not None and any(start < n for (start, _), n in zip(spans, prefix_lengths, strict=True)):
            raise ValueError("a span to average starts inside a shared prefix; only tail tokens are read")
        for batch in token_batches([len(t) for t in tails], max_batch_tokens, prefix_lengths=prefix_lengths):
            input_ids, tail_mask, _ = pad_batch([tails[i] for i in batch], pad_id, "right", device)
            rows, length = input_ids.shape
            lengths = [prefix_lengths[i] for i in batch]
            longest = max(lengths)
            layers, _, kv_heads, _, head_dim = prefix_kv[prefix_of[batch[0]]].shape
            kv = prefix_kv[0].new_zeros((layers, 2, rows, kv_heads, longest, head_dim))
            prefix_mask = torch.zeros((rows, longest), dtype=tail_mask.dtype, device=device)
            for row, (index, n) in enumerate(zip(batch, lengths)):
                kv[:, :, row, :, longest - n :] = prefix_kv[prefix_of[index]]
                prefix_mask[row, longest - n :] = 1
            attention_mask = torch.cat([prefix_mask, tail_mask], 1)
            _count(stats, tail_mask)
            position_ids = torch.tensor(lengths, device=device)[:, None] + torch.arange(length, device=device)
            cache = DynamicCache(ddp_cache_data=[(kv[layer, 0], kv[layer, 1]) for layer in range(layers)])
            decoder(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{cache_arg: cache},
            )
            last = last_positions(tail_mask, "right")
            if spans is None:
                states = captured[-1][torch.arange(rows, device=device), last]
            else:
                columns = [(spans[i][0] - n, spans[i][1] - n) for i, n in zip(batch, lengths, strict=True)]
                states = span_mean(captured[-1], last, columns)
            out[torch.as_tensor(batch)] = states.float().cpu()
    return out


@contextlib.contextmanager
def capture_pre_norm(model: nn.Module):
    """Hold the input of the final norm (the pre-norm hidden states) of the latest forward inside the block.

    Only the latest is kept, so memory does not grow with the number of batches.
    """
    captured: list[torch.Tensor] = []

    def keep_latest(_module, args):
        captured[:] = [args[0]]

    handle = final_norm(model).register_forward_pre_hook(keep_latest)
    try:
        yield captured
    finally:
        handle.remove()


def _count(stats: dict[str, int] | None, attention_mask: torch.Tensor) -> None:
    if stats is not None:
        stats["tokens"] = stats.get("tokens", 0) + int(attention_mask.sum())
        stats["padded_tokens"] = stats.get("padded_tokens", 0) + attention_mask.numel()
        stats["forwards"] = stats.get("forwards", 0) + 1


def padding_waste(lengths: Sequence[int], max_batch_tokens: int) -> float:
    """Share of pad tokens when sequences of these lengths are batched by `token_batches`."""
    batches = token_batches(lengths, max_batch_tokens)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1.0 - sum(lengths) / padded if padded else 0.0
