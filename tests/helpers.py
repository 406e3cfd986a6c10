"""Helpers shared by the test files: the tiny model's configs, small data (robot skills and instructions, our own
text) and builders of what several files start from (a BEIR folder, a checkpoint, an index).

Shared fixtures are in conftest.py; tiny seeded configs of every supported model family are in tiny_families.py.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import socket
from pathlib import Path
from types import ModuleType

import torch

from rabtriever_ray.config import (
    DistillConfig,
    IndexConfig,
    PromptConfig,
    StudentConfig,
    TeacherConfig,
    TeacherTrainConfig,
    load_config,
    to_dict,
)
from rabtriever_ray.models import load_causal_lm
from rabtriever_ray.teacher import GenerativeReranker

ROOT = Path(__file__).resolve().parent.parent

# The prompt limits of the tiny teacher in unit tests (tokens), and the teacher with them.
TINY_PROMPT = PromptConfig(max_doc_tokens=48, max_query_tokens=32)
TINY_TEACHER = TeacherConfig(model="tiny-random-llama", prompt=TINY_PROMPT)

# Overrides of a distillation run small enough for a unit test: the tiny model, a slice of the demo data, two
# workers and a teacher actor sharing 2 CPUs.
TINY_DISTILL = [
    "teacher=tiny-random-llama",
    "max_train_queries=20",
    "max_val_queries=8",
    "candidates=bm25:4",
    "val_candidates=bm25:6",
    "unlabelled_queries=",
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
    "baselines=",
]

# A teacher fine-tuning small enough for a unit test: the tiny model, a slice of the demo data, two workers.
TINY_FINETUNE = [
    "teacher=tiny-random-llama",
    "max_queries=16",
    "max_val_queries=6",
    "negatives=3",
    "batch_size=2",
    "num_workers=2",
    "cpus_per_worker=0.5",
    "teacher_cpus=0.5",
    "lr=0.001",
    "warmup_steps=1",
    "teacher.prompt.max_query_tokens=32",
    "teacher.prompt.max_doc_tokens=48",
]
# Teacher fine-tuning with DeepSpeed ZeRO-2 and LoRA (added to TINY_FINETUNE).
DEEPSPEED_LORA = ["name=ds", "strategy=deepspeed", "zero_stage=2", "lora=true", "lora_r=4", "report_every=2"]

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

# Bad rows appended to the skills folder by `write_broken_beir`; the comments give their line numbers there.
BROKEN_CORPUS = [
    '{"_id": "broken json", "text": ',  # line 7: malformed JSON
    '{"title": "No id", "text": "a document without an id"}',  # line 8: missing _id
    '{"_id": "empty_doc", "title": "", "text": "   "}',  # line 9: empty document
    '{"_id": "pick_cup", "title": "Again", "text": "a duplicate id"}',  # line 10: duplicate
    '["not", "an", "object"]',  # line 11
]
BROKEN_QUERIES = [
    '{"_id": "q6", "text": ""}',  # line 6: empty query text
    '{"_id": "q7"}',  # line 7: missing text
    '{"_id": "q8", "text": "fine", "metadata": "nope"}',  # line 8: metadata not an object
]
BROKEN_QRELS = [
    "q1\tno_such_doc\t1",  # line 7: unknown document
    "q99\tpick_cup\t1",  # line 8: unknown query
    "q2\tpick_cup\tmaybe",  # line 9: bad score
    "q2\tpick_cup",  # line 10: two fields
]


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


def write_broken_beir(root):
    """The skills folder with the BROKEN_* rows appended to its corpus, queries and qrels; returns its path."""
    return write_beir(
        root,
        extra_corpus_lines=BROKEN_CORPUS,
        extra_query_lines=BROKEN_QUERIES,
        extra_qrel_lines=BROKEN_QRELS,
    )


def distill_config(tmp_path, *extra) -> DistillConfig:
    """The TINY_DISTILL run writing to ``tmp_path / "run"``, with ``extra`` overrides (``key=value``)."""
    return load_config(DistillConfig, None, TINY_DISTILL + [f"out_dir={tmp_path / 'run'}", *extra])


def finetune_config(tmp_path, *extra) -> TeacherTrainConfig:
    """The TINY_FINETUNE run writing to ``tmp_path / "teacher"``, with ``extra`` overrides (``key=value``)."""
    return load_config(TeacherTrainConfig, None, TINY_FINETUNE + [f"out={tmp_path / 'teacher'}", *extra])


def assert_reproduces_val_scores(out: Path, tolerance: float) -> None:
    """The teacher saved in ``out``, loaded on CPU in fp32, scores its first ``val_scores`` pairs as written."""
    import pyarrow.parquet as pq

    scored = pq.ParquetDataset(str(out / "val_scores" / "data")).read().slice(0, 12)
    model, tokenizer = load_causal_lm(str(out), device="cpu")
    again = GenerativeReranker(model, tokenizer, TINY_PROMPT).score(
        scored.column("query_text").to_pylist(), scored.column("doc_text").to_pylist()
    )
    torch.testing.assert_close(
        again.score,
        torch.tensor(scored.column("teacher_score").to_pylist()),
        atol=tolerance,
        rtol=tolerance,
    )


def save_checkpoint(path, seed=0, teacher=TINY_TEACHER):
    """A tiny student with a seeded, non-zero predictor (an untrained one scores every document the same)."""
    from rabtriever_ray.student import Rabtriever

    student = Rabtriever(
        GenerativeReranker.from_config(teacher, device="cpu"),
        StudentConfig(predictor_hidden=32, proj_dim=16, seed=seed),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.predictor.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    student.save_trainable(path, teacher=teacher.model, prompt=to_dict(teacher.prompt), max_batch_tokens=4096)
    return path


def save_checkpoint_and_index(root, teacher=TINY_TEACHER):
    """A tiny checkpoint of ``teacher`` and a flat index over the skills corpus (written to ``root / "skills"``),
    under ``root`` (needs Ray); returns (checkpoint, index)."""
    from rabtriever_ray.index import build_index

    checkpoint = save_checkpoint(root / "checkpoint", teacher=teacher)
    index = root / "index"
    build_index(
        IndexConfig(checkpoint, write_beir(root / "skills"), index, "flat", cpus_per_actor=0.5, batch_size=4)
    )
    return checkpoint, index


# llama.cpp's tensor names for the parts of a Llama decoder layer (convert_hf_to_gguf.py, gguf-py's TensorNameMap).
_GGUF_LAYER_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def write_tiny_gguf(path):
    """The tiny random Llama written to ``path`` as llama.cpp's convert_hf_to_gguf.py writes a Llama (float32
    tensors, byte-level BPE vocabulary and merges, chat template); returns the source ``(model, tokenizer)``.

    llama.cpp permutes the rows of attn_q and attn_k (``LlamaModel.permute``: each head's rotary halves
    interleaved) and transformers' GGUF loader undoes it, so the file holds the permuted weights.
    """
    import gguf
    from gguf import TokenType

    from rabtriever_ray.models import build_tiny_random_llama

    model, tokenizer = build_tiny_random_llama()
    config = model.config
    rope = config.rope_parameters["rope_theta"] if hasattr(config, "rope_parameters") else config.rope_theta
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-random-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(rope)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)

    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    tokens = [token for token, _ in sorted(backend["model"]["vocab"].items(), key=lambda item: item[1])]
    control = {added["content"] for added in backend["added_tokens"] if added["special"]}
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([TokenType.CONTROL if t in control else TokenType.NORMAL for t in tokens])
    writer.add_token_merges([" ".join(pair) for pair in backend["model"]["merges"]])
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_chat_template(tokenizer.chat_template)

    def permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
        halves = weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        return halves.swapaxes(1, 2).reshape(weight.shape)

    tensors = {
        "token_embd.weight": model.model.embed_tokens.weight,
        "output_norm.weight": model.model.norm.weight,
        "output.weight": model.lm_head.weight,
    }
    for index, layer in enumerate(model.model.layers):
        for hf_name, gguf_name in _GGUF_LAYER_TENSORS.items():
            weight = layer.get_submodule(hf_name).weight.detach()
            if gguf_name == "attn_q":
                weight = permute(weight, config.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = permute(weight, config.num_key_value_heads)
            tensors[f"blk.{index}.{gguf_name}.weight"] = weight
    for name, tensor in tensors.items():
        writer.add_tensor(name, tensor.detach().to(torch.float32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model.eval(), tokenizer


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the system picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_script(path: str) -> ModuleType:
    """A script of this repository (``jobs/index.py``, ``benchmarks/complexity.py``) imported as a module, from
    its path relative to the repository root."""
    spec = importlib.util.spec_from_file_location(f"script_{Path(path).stem}", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
