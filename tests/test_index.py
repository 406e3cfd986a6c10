"""Index (Ray Data encoding + FAISS), reload and mismatch checks, and two-stage search against brute force."""

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from helpers import TINY_TEACHER as TEACHER
from helpers import load_script, save_checkpoint, write_beir

from rabtriever_ray.config import (
    ConfigError,
    IndexConfig,
    PromptConfig,
    TeacherConfig,
)
from rabtriever_ray.faiss_build import faiss_index
from rabtriever_ray.index import DocumentIndex, IndexFolderError, build_index
from rabtriever_ray.io import OutputExistsError
from rabtriever_ray.search import Searcher
from rabtriever_ray.student import load_student, load_student_info

QUERIES = ["I spilled juice everywhere, can you clean the table?", "please fill my glass", "shut the door"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_beir(tmp_path_factory.mktemp("skills") / "skills")


@pytest.fixture(scope="module")
def index(ray_local, checkpoint, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("index") / "flat"
    build_index(IndexConfig(checkpoint, data, out, "flat", cpus_per_actor=0.5, batch_size=4))
    return out


def test_index_folder_holds_the_student_encodings(index, checkpoint, data):
    manifest = json.loads((index / "manifest.json").read_text())
    assert manifest["count"] == 6 and manifest["proj_dim"] == 16 and manifest["hidden_size"] == 64
    assert manifest["teacher"]["model"] == "tiny-random-llama" and manifest["index_type"] == "flat"
    table = pq.ParquetDataset([str(index / "embeddings" / f) for f in manifest["files"]]).read()
    assert table.column_names == ["doc_id", "doc_text", "doc_hidden", "doc_vec"]
    assert sorted(table.column("doc_id").to_pylist()) == sorted(
        ["pick_cup", "open_drawer", "wipe_table", "pour_water", "close_door", "stack_blocks"]
    )
    # The Ray actors wrote what the student computes in-process for the same documents.
    student = load_student(checkpoint)
    texts = table.column("doc_text").to_pylist()
    with torch.no_grad():
        hidden = student.encode_documents(texts)
        vectors = student.embed_documents(hidden)
    stored = np.array(table.column("doc_vec").to_pylist(), dtype=np.float32)
    np.testing.assert_allclose(stored, vectors.numpy(), atol=1e-5)
    assert texts[0].count("\n") == 1  # title, newline, text


def test_a_finished_index_is_not_overwritten(index, checkpoint, data):
    with pytest.raises(OutputExistsError, match="--overwrite"):
        build_index(IndexConfig(checkpoint, data, index))


def test_search_matches_brute_force_scoring(index, checkpoint):
    searcher = Searcher(checkpoint, index)
    student, docs = searcher.student, searcher.index
    with torch.no_grad():
        h_query = student.encode_queries(QUERIES)
        # Reference: every (query, document) pair scored on its own.
        pair_scores = torch.stack(
            [
                torch.stack(
                    [student.score(h_query[i : i + 1], docs.doc_hidden[j : j + 1])[0] for j in range(6)]
                )
                for i in range(3)
            ]
        )
    exhaustive = searcher.search(QUERIES, top_k=3)
    for i, hits in enumerate(exhaustive):
        order = torch.argsort(pair_scores[i], descending=True)[:3].tolist()
        assert [h.doc_id for h in hits] == [docs.doc_ids[j] for j in order]
        np.testing.assert_allclose([h.score for h in hits], pair_scores[i, order].numpy(), atol=1e-4)
        assert hits[0].text == docs.doc_text[order[0]]

    # Through FAISS with a first stage covering the corpus: the same ranking.
    searcher.exhaustive_max_docs = 0
    assert [[h.doc_id for h in r] for r in searcher.search(QUERIES, top_k=3, first_stage_k=6)] == [
        [h.doc_id for h in r] for r in exhaustive
    ]
    # A narrower first stage: the predictor ranks exactly the first stage's top 2 (inner products by hand).
    with torch.no_grad():
        first = (student.embed_queries(h_query) @ student.embed_documents(docs.doc_hidden).T).numpy()
    for i, hits in enumerate(searcher.search(QUERIES, top_k=2, first_stage_k=2)):
        shortlist = np.argsort(-first[i])[:2]
        expected = sorted(shortlist, key=lambda j: -pair_scores[i, j].item())
        assert [h.doc_id for h in hits] == [docs.doc_ids[j] for j in expected]
    # No rerank: the first stage's cosines, best first.
    for i, hits in enumerate(searcher.search(QUERIES, top_k=6, rerank="none")):
        np.testing.assert_allclose([h.score for h in hits], np.sort(first[i])[::-1], atol=1e-5)


def test_float16_document_states_score_as_float32(index, checkpoint):
    """Serve holds the states in float16 (ServeConfig.doc_states): half the memory, and the predictor's scores
    within 1e-3 of float32's on the tiny model (float16 keeps 11 significant bits, about 5e-4 of each value)."""
    full, half = DocumentIndex.load(index), DocumentIndex.load(index, "float16")
    assert (full.doc_hidden.dtype, half.doc_hidden.dtype) == (torch.float32, torch.float16)
    assert 2 * half.doc_hidden.nbytes == full.doc_hidden.nbytes
    student, teacher = load_student(checkpoint), load_student_info(checkpoint)["teacher_config"]
    for exhaustive_max_docs in (10_000, 0):  # the predictor over every document, then over FAISS's candidates
        scores = []
        for docs in (full, half):
            searcher = Searcher.from_student(student, teacher, docs, exhaustive_max_docs=exhaustive_max_docs)
            found = searcher.search(QUERIES, top_k=6, first_stage_k=6)
            scores.append([{hit.doc_id: hit.score for hit in hits} for hits in found])
        for exact, halved in zip(*scores):
            assert exact.keys() == halved.keys() and len(exact) == 6
            np.testing.assert_allclose([halved[d] for d in exact], list(exact.values()), atol=1e-3)


def test_teacher_rerank_returns_the_teachers_order(index, checkpoint):
    searcher = Searcher(checkpoint, index)
    student_hits = searcher.search(QUERIES, top_k=4)
    teacher_hits = searcher.search(QUERIES, top_k=4, rerank="teacher")
    for query, s_hits, t_hits in zip(QUERIES, student_hits, teacher_hits):
        assert {h.doc_id for h in t_hits} == {h.doc_id for h in s_hits}
        reference = searcher.teacher.score([query] * 4, [h.text for h in s_hits]).score.tolist()
        expected = sorted(zip(reference, [h.doc_id for h in s_hits]), reverse=True)
        assert [h.doc_id for h in t_hits] == [d for _, d in expected]
        np.testing.assert_allclose([h.score for h in t_hits], [s for s, _ in expected], atol=1e-5)
    with pytest.raises(ValueError, match="rerank"):
        searcher.search(QUERIES, rerank="bm25")


def test_index_types_agree_with_exact_search():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[:5] + 0.01 * rng.standard_normal((5, 16)).astype(np.float32)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    flat = faiss_index(vectors, "flat")
    np.testing.assert_array_equal(flat.search(queries, 5)[1], exact)
    hnsw = faiss_index(vectors, "hnsw", hnsw_m=16)
    hnsw.hnsw.efSearch = 400
    np.testing.assert_array_equal(hnsw.search(queries, 5)[1], exact)
    ivf = faiss_index(vectors, "ivf")
    assert ivf.nlist == 10  # min(4 sqrt(400), 400 // 39)
    ivf.nprobe = ivf.nlist  # probing every list is exact
    np.testing.assert_array_equal(ivf.search(queries, 5)[1], exact)
    with pytest.raises(ValueError, match="empty corpus"):
        faiss_index(vectors[:0], "flat")


def test_an_index_built_chunk_by_chunk_equals_one_built_at_once_and_ivf_trains_on_a_sample(monkeypatch):
    import rabtriever_ray.faiss_build as faiss_build
    from rabtriever_ray.faiss_build import faiss_index_from_chunks

    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((400, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[::40] + 0.01 * rng.standard_normal((10, 16)).astype(np.float32)
    calls = []

    def chunks():
        calls.append(1)
        return (vectors[i : i + 70] for i in range(0, 400, 70))

    chunked = faiss_index_from_chunks(chunks, 400, 16, "flat", use_gpu=False)
    assert chunked.ntotal == 400 and len(calls) == 1
    np.testing.assert_array_equal(
        chunked.search(queries, 5)[1], faiss_index(vectors, "flat").search(queries, 5)[1]
    )

    monkeypatch.setattr(faiss_build, "IVF_TRAIN_POINTS_PER_LIST", 20)  # 10 lists x 20 = a 200-vector sample
    sample = faiss_build.ivf_training_sample(chunks, 400, 10)
    assert (
        140 < len(sample) < 260 and np.isin(sample[:, 0], vectors[:, 0]).all()
    )  # about half, of the vectors
    assert np.isin(vectors[350:, 0], sample[:, 0]).any()  # the last chunk too
    np.testing.assert_array_equal(sample, faiss_build.ivf_training_sample(chunks, 400, 10))  # seeded
    calls.clear()
    ivf = faiss_index_from_chunks(chunks, 400, 16, "ivf", use_gpu=False)
    assert len(calls) == 2  # once for the sample, once to add
    assert ivf.ntotal == 400 and ivf.nlist == 10
    ivf.nprobe = ivf.nlist  # probing every list is exact
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :5]
    np.testing.assert_array_equal(ivf.search(queries, 5)[1], exact)
    with pytest.raises(RuntimeError, match="indexed 400 vectors, expected 401"):
        faiss_index_from_chunks(chunks, 401, 16, "flat", use_gpu=False)


def test_hnsw_index_job_and_reload(ray_local, checkpoint, data, tmp_path):
    job = load_script("jobs/index.py")
    out = tmp_path / "hnsw"
    args = ["--checkpoint", str(checkpoint), "--data", str(data), "--out", str(out), "--index-type", "hnsw"]
    manifest = job.main(args + ["--cpus-per-actor", "0.5", "--batch-size", "2"])
    assert manifest["index_params"] == {"hnsw_m": 32} and len(manifest["files"]) >= 1
    loaded = DocumentIndex.load(out)
    assert len(loaded) == 6 and loaded.doc_hidden.shape == (6, 64)
    assert hasattr(loaded.faiss, "hnsw")


def test_mismatched_or_broken_index_is_a_clear_error(index, checkpoint, tmp_path):
    other = save_checkpoint(tmp_path / "other", seed=1)
    with pytest.raises(IndexFolderError, match="another d_proj"):
        Searcher(other, index)
    reprompted = TeacherConfig(
        model="tiny-random-llama", prompt=PromptConfig(max_doc_tokens=40, max_query_tokens=32)
    )
    with pytest.raises(IndexFolderError, match="another prompt"):
        Searcher(save_checkpoint(tmp_path / "prompt", teacher=reprompted), index)

    broken = tmp_path / "broken"
    shutil.copytree(index, broken)
    first = json.loads((broken / "manifest.json").read_text())["files"][0]
    (broken / "embeddings" / first).unlink()
    with pytest.raises(IndexFolderError, match="missing embeddings/"):
        DocumentIndex.load(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(IndexFolderError, match="not a finished jobs/index.py output"):
        DocumentIndex.load(broken)


def test_bad_checkpoint_or_data_fails_before_any_work(ray_local, checkpoint, tmp_path):
    from rabtriever_ray.data import DataError

    with pytest.raises(FileNotFoundError, match="not a Rabtriever checkpoint"):
        build_index(IndexConfig(tmp_path, tmp_path, tmp_path / "out"))
    with pytest.raises(DataError, match="no corpus"):
        build_index(IndexConfig(checkpoint, tmp_path, tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    legacy = tmp_path / "legacy"
    shutil.copytree(checkpoint, legacy)
    info = json.loads((legacy / "student.json").read_text())
    del info["prompt"]
    (legacy / "student.json").write_text(json.dumps(info))
    with pytest.raises(ConfigError, match="records no teacher/prompt"):
        load_student(legacy)
    assert load_student(legacy, TEACHER).config.proj_dim == 16
