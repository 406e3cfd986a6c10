"""GPU paths: bf16 by default on CUDA, teacher and student on the device. Skipped without a GPU."""

import pytest
import torch
from helpers import (
    DEEPSPEED_LORA,
    DOCUMENTS,
    QUERIES,
    TINY_PROMPT,
    assert_reproduces_val_scores,
    distill_config,
    finetune_config,
    save_checkpoint,
    write_beir,
)

from rabtriever_ray.models import load_causal_lm
from rabtriever_ray.student import Rabtriever
from rabtriever_ray.teacher import GenerativeReranker

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_cuda_defaults_to_bf16_and_matches_fp32():
    model, tokenizer = load_causal_lm("tiny-random-llama")
    assert next(model.parameters()).device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16
    teacher = GenerativeReranker(model, tokenizer, TINY_PROMPT)
    bf16 = teacher.score(QUERIES, DOCUMENTS)
    ref_model, _ = load_causal_lm("tiny-random-llama", device="cpu")
    ref = GenerativeReranker(ref_model, tokenizer, teacher.prompts.config).score(QUERIES, DOCUMENTS)
    assert bf16.hidden.dtype == torch.float32 and bf16.hidden.device.type == "cpu"
    torch.testing.assert_close(bf16.hidden, ref.hidden, atol=0.05, rtol=0.05)
    torch.testing.assert_close(bf16.score, ref.score, atol=0.05, rtol=0.05)

    single = [teacher.score([q], [d]).score[0] for q, d in zip(QUERIES, DOCUMENTS)]
    torch.testing.assert_close(torch.stack(single), bf16.score, atol=0.02, rtol=0.02)

    student = Rabtriever(teacher)
    assert student.q_proj.weight.device.type == "cuda"
    h_q = student.encode_queries(QUERIES)
    h_d = student.encode_documents(DOCUMENTS)
    matrix = student.score_matrix(h_q, h_d)
    assert matrix.device.type == "cuda" and torch.isfinite(matrix).all()
    empty = teacher.score(QUERIES, [""] * len(QUERIES)).score
    torch.testing.assert_close(matrix[:, 0].cpu(), empty, atol=0.02, rtol=0.02)
    loss = student.score(h_q, h_d).sum()
    loss.backward()
    assert student.predictor.fc_out.weight.grad is not None


def test_cuda_shared_prefix_matches_plain_batching():
    model, tokenizer = load_causal_lm("tiny-random-llama", dtype=torch.float32)
    teacher = GenerativeReranker(model, tokenizer, TINY_PROMPT)
    queries, documents = QUERIES * 2, [DOCUMENTS[0]] * 4 + DOCUMENTS
    shared = teacher.score(queries, documents)
    teacher.share_prefix = False
    plain = teacher.score(queries, documents)
    torch.testing.assert_close(shared.hidden, plain.hidden, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared.score, plain.score, atol=1e-4, rtol=1e-4)


@pytest.mark.slow  # a full Ray Train distillation
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_distillation_shares_one_gpu_between_teacher_actors_and_training(ray_local, tmp_path, strategy):
    """use_gpu on one GPU: teacher actors and the training worker each hold half of it (NCCL, bf16 backbone).

    Two rounds, so the round sampler runs on the GPU too; DeepSpeed also recovers from a failure.
    """
    from rabtriever_ray.distill import run_distill

    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    marker = tmp_path / "failed"
    config = distill_config(
        tmp_path,
        f"name=gpu_{strategy}",
        f"strategy={strategy}",
        "use_gpu=true",
        "num_workers=1",
        "gpus_per_worker=0.5",
        "teacher_gpus=0.5",
        "epochs=3",
        "rounds=2",
        "round_epochs=1",
        "round_k=2",
        "round_pool=bm25:8",
        "max_failures=1",
    )
    report = run_distill(config, fail_once_after_step=(str(marker), 8) if strategy == "deepspeed" else None)
    history = report["history"]
    assert [(h["round"], h["epoch"]) for h in history] == [(0, 0), (0, 1), (0, 2), (1, 3)]
    assert all(h["worker_peak_cuda_mb"][0] > 0 for h in history)  # the worker trained on the GPU
    assert history[2]["loss/total"] < history[0]["loss/total"]
    assert report["rounds"][1]["pairs_scored_by_teacher"] >= 2 * 20
    assert marker.exists() == (strategy == "deepspeed")


def test_index_encoder_actors_run_on_the_gpu(ray_local, tmp_path):
    """jobs/index.py's encoder actors take a GPU (bf16 backbone); the vectors match the fp32 CPU student."""
    import numpy as np
    import pyarrow.parquet as pq

    from rabtriever_ray.config import IndexConfig
    from rabtriever_ray.index import build_index
    from rabtriever_ray.search import Searcher
    from rabtriever_ray.student import load_student

    data = write_beir(tmp_path / "skills")
    checkpoint = save_checkpoint(tmp_path / "checkpoint")
    manifest = build_index(
        IndexConfig(checkpoint, data, tmp_path / "index", cpus_per_actor=0.5)
    )  # 1 GPU per actor: default
    table = pq.ParquetDataset(str(tmp_path / "index" / "embeddings")).read()
    student = load_student(checkpoint, device="cpu")
    with torch.no_grad():
        reference = student.embed_documents(student.encode_documents(table.column("doc_text").to_pylist()))
    on_gpu = torch.tensor(np.array(table.column("doc_vec").to_pylist(), dtype=np.float32))
    cosine = torch.nn.functional.cosine_similarity(on_gpu, reference, dim=-1)
    assert (
        manifest["count"] == 6 and cosine.min() > 0.99 and not torch.equal(on_gpu, reference)
    )  # bf16, not fp32
    searcher = Searcher(checkpoint, tmp_path / "index")
    assert searcher.student.q_proj.weight.device.type == "cuda"
    assert len(searcher.search(["please wipe the table"], top_k=3, rerank="teacher")[0]) == 3


@pytest.mark.slow  # a full Ray Train fine-tuning
@pytest.mark.parametrize("strategy", ["ddp", "deepspeed"])
def test_teacher_fine_tuning_on_one_gpu(ray_local, tmp_path, strategy):
    """jobs/train_teacher.py with use_gpu: NCCL, bf16 autocast, validation actors on the GPU; DeepSpeed ZeRO-2
    LoRA also recovers from a failure. The saved model, loaded on CPU in fp32, reproduces the GPU's bf16 scores."""
    import json

    from rabtriever_ray.finetune import run_train_teacher

    if strategy == "deepspeed":
        pytest.importorskip("deepspeed")
    marker = tmp_path / "failed"
    extra = ["num_workers=1", "use_gpu=true", "gpus_per_worker=0.5", "teacher_gpus=0.5", "epochs=3"]
    if strategy == "deepspeed":
        extra += [*DEEPSPEED_LORA, "max_failures=1"]
    report = run_train_teacher(
        finetune_config(tmp_path, f"name=gpu_{strategy}", *extra),
        fail_once_after_step=(str(marker), 5) if strategy == "deepspeed" else None,
    )
    history = report["history"]
    assert all(h["worker_peak_cuda_mb"][0] > 0 for h in history)  # the worker trained on the GPU
    assert history[-1]["loss/listwise"] < history[0]["loss/listwise"]
    assert marker.exists() == (strategy == "deepspeed")
    assert report["before"] != report["after"]
    out = tmp_path / "teacher"
    assert json.loads((out / "rabtriever_teacher.json").read_text())["lora"] == (strategy == "deepspeed")
    assert_reproduces_val_scores(out, tolerance=0.05)  # bf16 on the GPU, fp32 here
