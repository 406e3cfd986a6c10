"""The backbone forward: batching, padding, and the pre-norm hidden state (with and without gradients)."""

import pytest
import torch

from rabtriever_ray.backbone import (
    last_positions,
    last_token_hidden,
    pad_batch,
    pre_norm_hidden_at,
    token_batches,
)
from rabtriever_ray.models import build_tiny_random_llama


def test_token_batches_respect_the_budget_and_cover_every_index():
    lengths = [5, 50, 7, 7, 30, 1, 200, 12]
    batches = token_batches(lengths, max_batch_tokens=60)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        assert longest * len(batch) <= 60 or len(batch) == 1
    assert [6] in batches  # longer than the budget: alone


def test_token_batches_count_the_cached_prefix_of_every_row():
    """Tails continuing a cached prefix: each row carries the batch's longest prefix, so rows x (longest
    prefix + longest tail) stays within the budget, not rows x longest tail alone."""
    tails = [10, 10, 10, 10, 9, 9]
    prefixes = [100, 5, 5, 100, 5, 5]
    batches = token_batches(tails, max_batch_tokens=240, prefix_lengths=prefixes)
    assert sorted(i for b in batches for i in b) == list(range(len(tails)))
    for batch in batches:
        width = max(tails[i] for i in batch) + max(prefixes[i] for i in batch)
        assert width * len(batch) <= 240 or len(batch) == 1
    assert len(token_batches(tails, max_batch_tokens=240)) == 1  # the tails alone would fit one batch


@pytest.mark.parametrize("side", ["left", "right"])
def test_pad_batch_positions_count_real_tokens(side):
    ids, mask, positions = pad_batch(
        [[1, 2, 3], [4]], pad_id=0, padding_side=side, device=torch.device("cpu")
    )
    if side == "left":
        assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
        assert positions[1, -1].item() == 0
    else:
        assert ids.tolist() == [[1, 2, 3], [4, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert positions[0].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="empty"):
        pad_batch([[1], []], 0, side, torch.device("cpu"))


def test_last_token_hidden_is_the_pre_norm_state(tiny):
    model, tokenizer = tiny
    seqs = [tokenizer("a short one").input_ids, tokenizer("and a somewhat longer sequence here").input_ids]
    hidden = last_token_hidden(model, seqs, tokenizer.pad_token_id, max_batch_tokens=1024)
    assert hidden.shape == (2, 64) and not hidden.is_inference()
    for row, seq in enumerate(seqs):
        with torch.no_grad():
            out = model(torch.tensor([seq]), output_hidden_states=True)
        # Post-norm states differ from ours, but the model's own norm of ours gives its logits.
        torch.testing.assert_close(
            model.lm_head(model.model.norm(hidden[row])), out.logits[0, -1], atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize("side", ["left", "right"])
def test_pre_norm_hidden_at_is_last_token_hidden_with_gradients(side):
    model, tokenizer = build_tiny_random_llama()  # its own copy: this test sets gradients
    seqs = [tokenizer("a short one").input_ids, tokenizer("and a somewhat longer sequence here").input_ids]
    input_ids, attention_mask, position_ids = pad_batch(
        seqs, tokenizer.pad_token_id, side, torch.device("cpu")
    )
    last = last_positions(attention_mask, side)
    assert [int(input_ids[row, last[row]]) for row in range(2)] == [s[-1] for s in seqs]
    hidden = pre_norm_hidden_at(model, input_ids, attention_mask, position_ids, last)
    assert hidden.requires_grad
    hidden.sum().backward()
    assert model.model.embed_tokens.weight.grad is not None
    model.zero_grad(set_to_none=True)
    expected = last_token_hidden(model, seqs, tokenizer.pad_token_id, padding_side=side)
    torch.testing.assert_close(hidden.detach(), expected)
