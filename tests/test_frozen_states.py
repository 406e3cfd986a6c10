"""The frozen lower blocks of teacher fine-tuning, run once: replayed batches give the full forward's losses and
gradients on every supported family, both padding sides, and never run the lower blocks."""

import pytest
import torch
from helpers import DOCUMENTS, QUERIES, TINY_PROMPT
from tiny_families import FAMILIES, build_family

from rabtriever_ray.config import TeacherTrainConfig
from rabtriever_ray.families import decoder_layers
from rabtriever_ray.finetune_loop import (
    AnswerScorer,
    TrainingGroup,
    group_batch,
    make_trainable,
    teacher_losses,
)
from rabtriever_ray.frozen_states import FrozenStates
from rabtriever_ray.models import build_tiny_random_llama
from rabtriever_ray.prompts import PromptBuilder

CFG = TeacherTrainConfig(train_layers=1, w_pointwise=0.5)


def _setup(model, tokenizer, padding_side="right", max_bytes=1 << 30):
    tokenizer.padding_side = padding_side
    make_trainable(model, CFG)
    model.train()
    prompts = PromptBuilder(tokenizer, TINY_PROMPT)
    # Queries of different lengths, so that rows carry padding.
    groups = [
        TrainingGroup(f"q{i}", query * (i + 1), ["a", "b"], [DOCUMENTS[i % 4], DOCUMENTS[(i + 1) % 4]])
        for i, query in enumerate(QUERIES[:3])
    ]
    batch = group_batch(prompts, groups, "cpu")
    keys = [(i, j) for i in range(len(groups)) for j in range(2)]
    frozen = FrozenStates(model, len(decoder_layers(model)) - 1, padding_side, max_bytes)
    return AnswerScorer(model, prompts), batch, keys, frozen


def _step(model, scorer, batch, keys, frozen):
    model.zero_grad(set_to_none=True)
    with frozen.applied(keys, batch["attention_mask"]):
        terms = teacher_losses(scorer, batch, CFG)
    terms["total"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return terms["total"].detach(), grads


def _calls(block: torch.nn.Module) -> list[int]:
    calls: list[int] = []
    block.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_a_replayed_batch_gives_the_full_forwards_loss_and_gradients(family):
    model, tokenizer = build_family(family)
    for module in model.modules():  # GPT-2's and OPT's configs train with dropout (see the next tests)
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "attention_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    scorer, batch, keys, frozen = _setup(model, tokenizer)
    assert frozen.check(lambda: scorer(**{k: v for k, v in batch.items() if k != "sizes"}))
    original = decoder_layers(model)[0]
    lower = _calls(original)
    full_loss, full_grads = _step(model, scorer, batch, keys, frozen)
    assert frozen.counts == {"run": 1, "replayed": 0} and len(frozen.states) == len(keys)
    ran = len(lower)
    replayed_loss, replayed_grads = _step(model, scorer, batch, keys, frozen)
    assert frozen.counts == {"run": 1, "replayed": 1}
    assert len(lower) == ran  # the lower block did not run
    torch.testing.assert_close(replayed_loss, full_loss, atol=1e-5, rtol=1e-5)
    assert full_grads and set(replayed_grads) == set(full_grads)
    for name, grad in full_grads.items():
        torch.testing.assert_close(replayed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
    assert decoder_layers(model)[0] is original  # put back after the replay


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_rows_are_recorded_and_replayed_at_their_real_tokens(padding_side):
    model, tokenizer = build_tiny_random_llama(padding_side=padding_side)
    scorer, batch, keys, frozen = _setup(model, tokenizer, padding_side)
    full_loss, _ = _step(model, scorer, batch, keys, frozen)
    lengths = batch["attention_mask"].sum(-1).tolist()
    assert [frozen.states[key].shape[0] for key in keys] == lengths and len(set(lengths)) > 1
    # The same pairs in another order (other padding widths per row) replay to the same loss per group.
    order = [2, 0, 1]
    groups_batch = {k: v for k, v in batch.items()}
    rows = [r for g in order for r in (2 * g, 2 * g + 1)]
    for name in ("input_ids", "attention_mask", "position_ids"):
        groups_batch[name] = batch[name][rows]
    groups_batch["last"] = batch["last"][rows]
    replayed_loss, _ = _step(model, scorer, groups_batch, [keys[r] for r in rows], frozen)
    assert frozen.counts["replayed"] == 1
    torch.testing.assert_close(replayed_loss, full_loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_dropout_in_the_frozen_blocks_turns_the_cache_off(family):
    model, tokenizer = build_family(family)  # GPT-2's config: dropout 0.1 in training mode
    if family == "llama":
        for block in decoder_layers(model):
            block.self_attn.attention_dropout = 0.5
    scorer, batch, keys, frozen = _setup(model, tokenizer)
    assert not frozen.check(lambda: scorer(**{k: v for k, v in batch.items() if k != "sizes"}))
    _step(model, scorer, batch, keys, frozen)
    _step(model, scorer, batch, keys, frozen)
    assert not frozen.states and frozen.counts == {"run": 0, "replayed": 0}


def test_pairs_past_the_budget_run_in_full():
    model, tokenizer = build_tiny_random_llama()
    scorer, batch, keys, _ = _setup(model, tokenizer)
    longest = int(batch["attention_mask"].sum(-1).max())
    frozen = FrozenStates(model, 1, "right", max_bytes=longest * 64 * 4)  # one row's states (hidden 64, fp32)
    _step(model, scorer, batch, keys, frozen)
    assert 0 < len(frozen.states) < len(keys) and frozen.bytes <= frozen.max_bytes
    _step(model, scorer, batch, keys, frozen)
    assert frozen.counts == {"run": 2, "replayed": 0}
