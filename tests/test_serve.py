"""Ray Serve app over real HTTP on 127.0.0.1: every route, numerics against in-process models, bad input, auth,
batching, metrics, and the cheap parts of the no-argument default (the demo distillation itself is not run)."""

import asyncio
import base64
import contextlib
import dataclasses
import http.client
import json
import logging
import select
import shutil
import socket
import time
import types
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
import yaml
from helpers import TINY_TEACHER, free_port, save_checkpoint_and_index

from rabtriever_ray.config import ConfigError
from rabtriever_ray.search import Searcher
from rabtriever_ray.student import load_student, load_student_info
from rabtriever_ray.teacher import GenerativeReranker

serve_module = pytest.importorskip("rabtriever_ray.serve")
serve_logger = logging.getLogger("ray.serve")  # Serve's logger, where build_app logs
ROOT = Path(__file__).resolve().parent.parent
QUERY = "I spilled juice everywhere, can you clean the table?"
DOCUMENTS = [
    "Wipe the table with a sponge.",
    "Pour water into a glass.",
    "Open the drawer.",
    "Close the door.",
]
LONG = "please wipe every corner of the kitchen table " * 12  # over the tiny prompt's 32 / 48 token limits
# Small limits, so that each is cheap to exceed (the default 0.6 CPUs per app fit two apps on 2 CPUs).
SETTINGS = {
    "max_batch_size": 8,
    "batch_wait_timeout_s": 0.1,
    "max_documents": 8,
    "max_text_bytes": 2000,
    "max_request_bytes": 20000,
    "max_top_k": 5,
}

JSON_TYPE = {"content-type": "application/json"}
QUERY_FIRST_TEACHER = dataclasses.replace(
    TINY_TEACHER, prompt=dataclasses.replace(TINY_TEACHER.prompt, preset="qwen3-reranker")
)
SCHEMAS = ROOT / "docs" / "schemas"  # the Cohere v2 and Jina rerank responses, as docs/serving.md reads them


@pytest.fixture(scope="module")
def served(ray_local, tmp_path_factory):
    """The app on a tiny checkpoint and index, at http://127.0.0.1:<free port>/; Serve shut down afterwards.
    The checkpoint's teacher speaks a query-first preset (Qwen3-Reranker's format), so every route is checked
    against the in-process models with the query first (the default document-first preset serves the demo).

    Starting Serve is slow: every test that takes this fixture is marked ``slow``."""
    from ray import serve

    root = tmp_path_factory.mktemp("serve")
    checkpoint, index = save_checkpoint_and_index(root, QUERY_FIRST_TEACHER)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    app = serve_module.build_app({"checkpoint": str(checkpoint), "index": str(index), **SETTINGS})
    serve.run(app, name="rabtriever", route_prefix="/")
    yield {"url": f"http://127.0.0.1:{port}", "checkpoint": checkpoint, "index": index, "root": root}
    serve.shutdown()


@pytest.fixture(scope="module")
def student(served):
    return load_student(served["checkpoint"])


def _post(served, path, body, **kwargs):
    return requests.post(served["url"] + path, json=body, timeout=60, **kwargs)


def _handle(name, app="rabtriever"):
    from ray import serve

    return serve.get_deployment_handle(name, app_name=app)


# -- imports --------------------------------------------------------------------------------------------------


def test_serving_imports_no_training():
    """Serving imports nothing of the training stack; only building the demo (`demo.ensure_demo`) does, lazily."""
    import subprocess
    import sys

    code = (
        "import sys, rabtriever_ray.serve, rabtriever_ray.serve.application, rabtriever_ray.serve.batching, "
        "rabtriever_ray.serve.deployments, rabtriever_ray.serve.http, rabtriever_ray.serve.router, "
        "rabtriever_ray.demo\n"
        "print(sorted(m for m in sys.modules if m in {"
        "'rabtriever_ray.distill_loop', 'rabtriever_ray.distill', 'rabtriever_ray.rounds', 'rabtriever_ray.finetune_loop', "
        "'rabtriever_ray.pipeline', 'ray.train'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- happy paths and schemas ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_healthz_and_models(served):
    health = requests.get(served["url"] + "/healthz", timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok", "encoder": True, "reranker": True}
    models = requests.get(served["url"] + "/v1/models", timeout=30).json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["student", "teacher"]
    student, teacher = models["data"]
    assert (
        student["object"] == "model"
        and student["backbone"] == "tiny-random-llama"
        and student["dimensions"] == 16
    )
    assert student["index"]["count"] == 6 and teacher["backbone"] == "tiny-random-llama"
    assert student["precision"] == teacher["precision"] == {"scheme": "none"}  # quantize: int8 adds its figures
    # Names, not the server's paths.
    assert student["checkpoint"] == teacher["checkpoint"] == "checkpoint" and student["index"]["name"] == "index"
    assert str(served["root"]) not in json.dumps(models)


@pytest.mark.slow
def test_embeddings_are_the_first_stage_vectors(served, student):
    texts = ["clean the table", "fill my glass", LONG]
    body = _post(served, "/v1/embeddings", {"input": texts, "model": "student"}).json()
    assert body["object"] == "list" and body["model"] == "student"
    assert [d["object"] for d in body["data"]] == ["embedding"] * 3 and [
        d["index"] for d in body["data"]
    ] == [0, 1, 2]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    assert body["truncated"] == [2]
    with torch.no_grad():
        queries = student.embed_queries(student.encode_queries(texts)).numpy()
        documents = student.embed_documents(student.encode_documents(texts[:1])).numpy()
    np.testing.assert_allclose([d["embedding"] for d in body["data"]], queries, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(queries, axis=1), 1.0, atol=1e-5)
    # One string, documents, and the base64 encoding the OpenAI client asks for by default.
    body = _post(
        served, "/v1/embeddings", {"input": texts[0], "input_type": "document", "encoding_format": "base64"}
    )
    (item,) = body.json()["data"]
    vector = np.frombuffer(base64.b64decode(item["embedding"]), dtype=np.float32)
    np.testing.assert_allclose(vector, documents[0], atol=1e-4)


@pytest.mark.slow
def test_rerank_student_equals_score_matrix(served, student):
    documents = [*DOCUMENTS, LONG]
    response = _post(served, "/rerank", {"query": QUERY, "documents": documents, "model": "student"})
    body = response.json()
    assert response.status_code == 200 and body["model"] == "student"
    with torch.no_grad():
        expected = student.score_matrix(student.encode_queries([QUERY]), student.encode_documents(documents))[
            0
        ]
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and sorted(r["index"] for r in body["results"]) == [
        0,
        1,
        2,
        3,
        4,
    ]
    np.testing.assert_allclose(scores, expected[[r["index"] for r in body["results"]]].numpy(), atol=1e-4)
    assert all("document" not in r for r in body["results"])
    assert body["truncated"] == {"query": False, "documents": [4]}
    top = _post(
        served, "/rerank", {"query": QUERY, "documents": documents, "top_n": 2, "return_documents": True}
    )
    assert [(r["index"], r["document"]["text"]) for r in top.json()["results"]] == [
        (r["index"], documents[r["index"]]) for r in body["results"][:2]
    ]


@pytest.mark.slow
def test_rerank_student_reads_indexed_documents_from_the_index(served, student):
    """Documents the index holds are not encoded again: /rerank scores them as /search does."""
    hits = _post(served, "/search", {"query": QUERY, "top_k": 5, "rerank": "student"}).json()["results"]
    body = _post(served, "/rerank", {"query": QUERY, "documents": [h["text"] for h in hits]}).json()
    assert [r["index"] for r in body["results"]] == list(range(5))
    np.testing.assert_allclose(
        [r["relevance_score"] for r in body["results"]], [h["score"] for h in hits], atol=1e-6
    )
    with torch.no_grad():
        texts = [h["text"] for h in hits]
        fresh = student.score_matrix(student.encode_queries([QUERY]), student.encode_documents(texts))[0]
    np.testing.assert_allclose([r["relevance_score"] for r in body["results"]], fresh.numpy(), atol=1e-4)


@pytest.mark.slow
def test_rerank_teacher_equals_generative_reranker(served):
    documents = [*DOCUMENTS, LONG]
    body = _post(served, "/rerank", {"query": LONG, "documents": documents, "model": "teacher"}).json()
    teacher = GenerativeReranker.from_config(
        load_student_info(served["checkpoint"])["teacher_config"], device="cpu"
    )
    expected = teacher.score([LONG] * len(documents), documents)
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(documents))], expected.score.numpy(), atol=1e-4)
    assert body["model"] == "teacher" and body["truncated"] == {"query": True, "documents": [4]}
    assert expected.truncated.all()


def _check_rerank_response(body, documents, top_n=None, return_documents=False):
    """``body`` is a Cohere v2 and a Jina rerank response (docs/schemas/) with this server's ``model`` and
    ``truncated``, for a request of these ``documents`` (as sent), ``top_n`` and ``return_documents``."""
    import jsonschema  # a dependency of Ray

    for name in ("cohere-v2-rerank-response.json", "jina-rerank-response.json"):
        jsonschema.validate(body, json.loads((SCHEMAS / name).read_text()))
    assert uuid.UUID(body["id"]).version == 4
    results = body["results"]
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert len(results) == (len(documents) if top_n is None else min(top_n, len(documents)))
    assert len({r["index"] for r in results}) == len(results)
    texts = [doc if isinstance(doc, str) else doc["text"] for doc in documents]
    if return_documents:
        assert all(r["document"] == {"text": texts[r["index"]]} for r in results)
    else:
        assert all("document" not in r for r in results)
    assert body["meta"]["api_version"] == {"version": "2", "is_experimental": False}
    assert body["meta"]["billed_units"] == {"search_units": 1}
    tokens = body["usage"]["total_tokens"]
    assert body["meta"]["tokens"] == {"input_tokens": tokens, "output_tokens": 0} and tokens > 0
    assert body["usage"]["prompt_tokens"] == tokens
    assert body["model"] in ("student", "teacher") and set(body["truncated"]) == {"query", "documents"}


def _student_tokens(student, query, documents):
    """The tokens the Encoder reports for a rerank: the query's once, plus every document's."""
    prompts = student.teacher.prompts
    return prompts.query_prompts([query]).query_tokens[0] + sum(
        prompts.document_prompts(documents).doc_tokens
    )


@pytest.mark.slow
def test_rerank_speaks_cohere_v2_and_jina(served, student):
    """Today's form, Cohere v2's (at /v2/rerank) and Jina's ({"text"} objects) score alike; every response is
    both a Cohere v2 and a Jina response, with the tokens the student encoded."""
    today = _post(served, "/rerank", {"query": QUERY, "documents": DOCUMENTS}).json()
    cohere_body = {"model": "student", "query": QUERY, "documents": DOCUMENTS, "top_n": 2}
    cohere = _post(served, "/v2/rerank", {**cohere_body, "max_tokens_per_doc": 4096}).json()
    objects = [{"text": d} for d in DOCUMENTS[:2]] + DOCUMENTS[2:]  # Jina takes both, mixed
    jina = _post(served, "/rerank", {"query": QUERY, "documents": objects, "return_documents": True}).json()
    _check_rerank_response(today, DOCUMENTS)
    _check_rerank_response(cohere, DOCUMENTS, top_n=2)
    _check_rerank_response(jina, objects, return_documents=True)
    assert len({today["id"], cohere["id"], jina["id"]}) == 3
    ranked = [r["index"] for r in today["results"]]
    assert [r["index"] for r in cohere["results"]] == ranked[:2]
    assert [r["index"] for r in jina["results"]] == ranked
    for body in (cohere, jina):
        np.testing.assert_allclose(
            [r["relevance_score"] for r in body["results"]],
            [r["relevance_score"] for r in today["results"][: len(body["results"])]],
            atol=1e-5,
        )
    # Every document is scored (and counted) whatever top_n returns; 4096 > max_doc_tokens changes nothing.
    tokens = _student_tokens(student, QUERY, DOCUMENTS)
    assert [body["usage"]["total_tokens"] for body in (today, cohere, jina)] == [tokens] * 3


@pytest.mark.slow
@pytest.mark.parametrize("model", ["student", "teacher"])
def test_rerank_max_tokens_per_doc_cuts_before_scoring(served, student, model):
    """``max_tokens_per_doc`` cuts each document to its first tokens, then the model scores the cut texts."""
    documents = [LONG, DOCUMENTS[0], "a"]  # the tiny tokenizer: "a" is one token
    request = {"query": QUERY, "documents": documents, "model": model, "return_documents": True}
    body = _post(served, "/rerank", {**request, "max_tokens_per_doc": 3}).json()
    _check_rerank_response(body, documents, return_documents=True)  # the texts as sent
    prompts = student.teacher.prompts
    cut_texts, cut = prompts.cut_documents(documents, 3)
    assert cut == [True, True, False] and body["truncated"]["documents"] == [0, 1]
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    if model == "student":
        with torch.no_grad():
            h_query, h_doc = student.encode_queries([QUERY]), student.encode_documents(cut_texts)
            expected = student.score_matrix(h_query, h_doc)[0].numpy()
        tokens = _student_tokens(student, QUERY, cut_texts)
    else:
        teacher = GenerativeReranker.from_config(
            load_student_info(served["checkpoint"])["teacher_config"], device="cpu"
        )
        expected = teacher.score([QUERY] * len(documents), cut_texts).score.numpy()
        pairs = prompts.pair_prompts([QUERY] * len(documents), cut_texts)
        tokens = sum(pairs.query_tokens) + sum(pairs.doc_tokens)
    np.testing.assert_allclose([got[i] for i in range(len(documents))], expected, atol=1e-4)
    assert body["usage"]["total_tokens"] == tokens
    uncut = _post(served, "/rerank", request).json()
    assert uncut["usage"]["total_tokens"] > tokens and uncut["truncated"]["documents"] == [0]


@pytest.mark.slow
@pytest.mark.parametrize("rerank", ["none", "student", "teacher"])
def test_search_equals_the_in_process_searcher(served, rerank):
    response = _post(served, "/search", {"query": QUERY, "top_k": 3, "rerank": rerank})
    body = response.json()
    assert response.status_code == 200 and body["rerank"] == rerank and len(body["results"]) == 3
    assert body["truncated"] == {"query": False, "documents": []}
    (expected,) = Searcher(served["checkpoint"], served["index"]).search([QUERY], top_k=3, rerank=rerank)
    assert [(r["doc_id"], r["text"]) for r in body["results"]] == [(h.doc_id, h.text) for h in expected]
    np.testing.assert_allclose([r["score"] for r in body["results"]], [h.score for h in expected], atol=1e-4)


@pytest.mark.slow
def test_search_default_top_k_fits_max_top_k(served):
    body = _post(served, "/search", {"query": QUERY}).json()
    assert body["rerank"] == "student" and len(body["results"]) == SETTINGS["max_top_k"]


# -- bad input --------------------------------------------------------------------------------------------------

BAD = [
    ("/rerank", {"query": "", "documents": ["a"]}, 422, "query"),
    ("/rerank", {"query": "   ", "documents": ["a"]}, 422, "query"),
    ("/rerank", {"documents": ["a"]}, 422, "query"),
    ("/rerank", {"query": "q", "documents": []}, 422, "documents"),
    ("/rerank", {"query": "q", "documents": "a"}, 422, "documents"),
    ("/rerank", {"query": "q", "documents": ["a", ""]}, 422, "documents.1"),
    ("/rerank", {"query": "q", "documents": ["a", 3]}, 422, "documents.1"),
    ("/rerank", {"query": "q", "documents": ["a", None]}, 422, "documents.1"),
    ("/rerank", {"query": "q", "documents": ["a"] * 9}, 422, "documents"),
    ("/rerank", {"query": "q", "documents": ["a"], "top_n": 0}, 422, "top_n"),
    ("/rerank", {"query": "q", "documents": ["a"], "top_n": 9}, 422, "top_n"),
    ("/rerank", {"query": "q", "documents": ["a"], "model": "gpt"}, 422, "model"),
    ("/v2/rerank", {"query": "q", "documents": ["a"], "model": "rerank-v3.5"}, 422, "model"),
    ("/v2/rerank", {"query": "q", "documents": ["a", ""]}, 422, "documents.1"),
    ("/rerank", {"query": "q", "documents": ["a", {"text": ""}]}, 422, "documents.1.text"),
    ("/rerank", {"query": "q", "documents": [{"text": 3}]}, 422, "documents.0.text"),
    ("/rerank", {"query": "q", "documents": [{"txt": "a"}]}, 422, "documents.0.text"),
    ("/rerank", {"query": "q", "documents": [{"text": "a", "title": "b"}]}, 422, "documents.0.title"),
    ("/rerank", {"query": "q", "documents": [["a"]]}, 422, "documents.0"),
    ("/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": 0}, 422, "max_tokens_per_doc"),
    ("/rerank", {"query": "q", "documents": ["a"], "max_tokens_per_doc": "all"}, 422, "max_tokens_per_doc"),
    ("/rerank", {"query": "q", "documents": ["a", {"text": "é" * 1001}]}, 413, "documents.1.text"),
    ("/rerank", {"query": "q", "documents": ["a", "é" * 1001]}, 413, "documents.1"),
    ("/rerank", {"query": "q" * 2001, "documents": ["a"]}, 413, "query"),
    ("/search", {"query": ""}, 422, "query"),
    ("/search", {"query": "q", "top_k": 0}, 422, "top_k"),
    ("/search", {"query": "q", "top_k": 6}, 422, "top_k"),
    ("/search", {"query": "q", "top_k": "many"}, 422, "top_k"),
    ("/search", {"query": "q", "rerank": "bm25"}, 422, "rerank"),
    ("/v1/embeddings", {"input": []}, 422, "input"),
    ("/v1/embeddings", {"input": [1, 2]}, 422, "input.0"),
    ("/v1/embeddings", {"input": ["a", " "]}, 422, "input.1"),
    ("/v1/embeddings", {"input": ["a"] * 9}, 422, "input"),
    ("/v1/embeddings", {"input": "a", "model": "text-embedding-3-small"}, 422, "model"),
    ("/v1/embeddings", {"input": "a", "dimensions": 8}, 422, "dimensions"),
    ("/v1/embeddings", {"input": "a" * 2001}, 413, "input.0"),
    ("/rerank", {"query": "\ud83d", "documents": ["a"]}, 422, "query"),  # a lone surrogate
    ("/v1/embeddings", {"input": ["a", "x\udc00"]}, 422, "input.1"),
    ("/rerank", ["not", "an", "object"], 422, "body"),
    ("/rerank", {"query": "q", "documents": ["a"] * 8, "pad": "x" * 20001}, 413, "body"),
]


@pytest.mark.parametrize(
    "path, body, status, param", BAD, ids=[f"{b[0]}-{b[3]}-{i}" for i, b in enumerate(BAD)]
)
@pytest.mark.slow
def test_bad_input_is_a_4xx_naming_the_field(served, path, body, status, param):
    response = _post(served, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == status and param in error["message"]


@pytest.mark.slow
def test_many_bad_items_cost_one_short_message(served):
    body = _post(served, "/v1/embeddings", {"input": [1] * 8}).json()["error"]
    assert body["param"] == "input.0" and body["message"].endswith("(and 3 more errors)")
    assert body["message"].count("input.") == serve_module.http.MAX_REPORTED_ERRORS


def test_an_oversized_list_is_refused_before_its_items_are_read():
    from pydantic import ValidationError

    from rabtriever_ray.serve.http import MAX_LIST_ITEMS, EmbeddingRequest, RerankRequest

    for model, body in (
        (EmbeddingRequest, {"input": [0] * 2_000_000}),
        (RerankRequest, {"query": "q", "documents": [0] * (MAX_LIST_ITEMS + 1)}),
    ):
        with pytest.raises(ValidationError) as raised:
            model.model_validate(body)
        assert [e["type"] for e in raised.value.errors()] == ["too_long"]
    with pytest.raises(ConfigError, match="max_documents must be at most 10000"):
        serve_module.ServeConfig(max_documents=MAX_LIST_ITEMS + 1)


def test_non_finite_scores_are_a_model_error_naming_the_items():
    from rabtriever_ray.serve.http import RequestError, check_finite

    check_finite([0.5, -3.0], "the student", "documents")
    with pytest.raises(RequestError) as raised:
        check_finite([0.5, float("nan"), float("inf")], "the student", "documents")
    error = raised.value
    assert (error.status, error.param, error.kind) == (500, "documents", "model_error")
    assert "2 of 3 documents" in error.message and "documents 1, 2" in error.message


@pytest.mark.slow
def test_malformed_json_and_no_crashed_replica(served):
    response = requests.post(
        served["url"] + "/rerank", data="{not json", headers={"content-type": "application/json"}, timeout=30
    )
    assert response.status_code == 422 and response.json()["error"]["param"] == "body"
    # A chunked body (no Content-Length) is read and limited all the same.
    chunked = iter([b'{"query": "q", ', b'"documents": ["a"]}'])
    response = requests.post(
        served["url"] + "/rerank", data=chunked, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200 and response.json()["results"][0]["index"] == 0
    oversized = iter([b'{"query": "q", "documents": ["a"], "pad": "', b"x" * 20001, b'"}'])
    response = requests.post(
        served["url"] + "/rerank", data=oversized, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413 and response.json()["error"]["param"] == "body"
    # After every bad request above, the replicas still answer.
    assert requests.get(served["url"] + "/healthz", timeout=30).status_code == 200
    assert _post(served, "/rerank", {"query": "q", "documents": ["a"]}).status_code == 200


@pytest.mark.slow
def test_a_chunked_upload_is_answered_413_while_it_is_still_being_sent(served):
    """A chunked body is counted as it arrives: the 413 comes back while the client is still sending (the final
    chunk is never sent), so no replica holds more than max_request_bytes of it; the app answers normally after."""
    host, port = served["url"].removeprefix("http://").split(":")
    chunk = b"x" * 1000
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(
            b"POST /rerank HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        sent, deadline = 0, time.monotonic() + 30
        while not select.select([sock], [], [], 0.005)[0]:  # until the server answers
            assert time.monotonic() < deadline and sent < 20 * SETTINGS["max_request_bytes"], sent
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            except OSError:  # the server closed the connection after answering
                break
            sent += len(chunk)
        response = http.client.HTTPResponse(sock)
        response.begin()
        body = json.loads(response.read())
    assert response.status == 413 and body["error"]["param"] == "body", body
    assert "max_request_bytes=20000" in body["error"]["message"] and sent > SETTINGS["max_request_bytes"]
    assert requests.get(served["url"] + "/healthz", timeout=30).status_code == 200
    assert _post(served, "/rerank", {"query": "q", "documents": ["a"]}).status_code == 200


@pytest.mark.slow
def test_a_json_body_sent_as_a_form_is_a_415_naming_the_header(served):
    """curl -d without -H sends application/x-www-form-urlencoded: say so instead of "field required"."""
    body = json.dumps({"query": "q", "documents": ["a"]})
    form = {"content-type": "application/x-www-form-urlencoded"}
    response = requests.post(served["url"] + "/rerank", data=body, headers=form, timeout=30)
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert error["param"] == "Content-Type" and "application/json" in error["message"]
    # No Content-Type at all: the same.
    response = requests.post(served["url"] + "/rerank", data=body.encode(), timeout=30)
    assert response.status_code == 415 and "'none'" in response.json()["error"]["message"]
    # With the header the same body is served.
    response = requests.post(served["url"] + "/rerank", data=body, headers=JSON_TYPE, timeout=30)
    assert response.status_code == 200 and response.json()["results"][0]["index"] == 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl program")
def test_the_route_tour_and_readme_curl_examples_work(served):
    """Every `curl -s localhost:8000/...` line of docs/serving.md (its tour of every route) and every such command
    in the README (the walk-through's query), run as written against the app, answers 200."""
    import re
    import shlex
    import subprocess

    doc = (ROOT / "docs" / "serving.md").read_text()
    commands = [
        line.strip() for line in doc.splitlines() if line.strip().startswith("curl -s localhost:8000/")
    ]
    assert len(commands) >= 5, commands
    readme = re.findall(r"`(curl -s localhost:8000/[^`]+)`", (ROOT / "README.md").read_text())
    assert readme, "the README's walk-through queries the served model"
    commands += readme
    for command in commands:
        args = shlex.split(command.replace("localhost:8000", served["url"].removeprefix("http://")))
        done = subprocess.run([*args, "-w", "\\n%{http_code}"], capture_output=True, text=True, timeout=60)
        body, _, code = done.stdout.rpartition("\n")
        assert code == "200", (command, body)
        assert "error" not in json.loads(body), (command, body)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl program")
def test_the_serving_doc_curl_examples_work(served):
    """Every ```bash block of docs/serving.md that starts with curl, run by bash as written (against the test
    server's address), answers 200 with a response that fits the Cohere v2 and Jina schemas."""
    import re
    import shlex
    import subprocess

    doc = (ROOT / "docs" / "serving.md").read_text()
    blocks = [block.strip() for block in re.findall(r"```bash\n(.*?)```", doc, re.DOTALL)]
    blocks = [block for block in blocks if block.startswith("curl")]
    paths, document_kinds = set(), set()
    for block in blocks:
        assert block.count("curl ") == 1, block  # one command per block: the status below is its own
        command = block.replace("http://localhost:8000", served["url"])
        done = subprocess.run(
            ["bash", "-c", command + " -w '\\n%{http_code}'"], capture_output=True, text=True, timeout=120
        )
        text, _, code = done.stdout.rpartition("\n")
        assert code == "200", (block, text, done.stderr)
        args = shlex.split(block.replace("\\\n", " "))
        path = args[2].removeprefix("http://localhost:8000")
        request = json.loads(args[args.index("-d") + 1])
        paths.add(path)
        document_kinds |= {type(doc).__name__ for doc in request["documents"]}
        top_n, return_documents = request.get("top_n"), request.get("return_documents", False)
        _check_rerank_response(json.loads(text), request["documents"], top_n, return_documents)
    assert paths == {"/rerank", "/v1/rerank", "/v2/rerank"} and document_kinds == {"str", "dict"}, blocks


# -- batching ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("deployment, model", [("Encoder", "student"), ("Reranker", "teacher")])
def test_concurrent_requests_are_batched(served, deployment, model):
    before = _handle(deployment).stats.remote().result()["rerank"]
    bodies = [{"query": f"{QUERY} {i}", "documents": DOCUMENTS, "model": model} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda body: _post(served, "/rerank", body), bodies))
    assert [r.status_code for r in responses] == [200] * 8
    after = _handle(deployment).stats.remote().result()["rerank"]
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] < 8 and after["max_batch_size"] > 1


@pytest.mark.slow
def test_requests_arriving_during_a_batch_run_together_in_the_next(served):
    """Serve forms a batch while the previous one runs; `BatchedModel._admit` holds requests until the model
    thread frees, so the ones that trickle in during a long batch (further apart than batch_wait_timeout_s) run as
    one batch after it, not one batch each."""
    from ray import serve

    from rabtriever_ray.serve.batching import BatchedModel

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=32)
    class Slow(BatchedModel):
        BATCHED = ("_double_batch",)

        def __init__(self):
            self._start_batching(serve_module.ServeConfig(max_batch_size=16, batch_wait_timeout_s=0.01))

        async def double(self, x: int) -> int:
            await self._admit()
            return await self._double_batch(x)

        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
        async def _double_batch(self, xs: list[int]) -> list[int]:
            return await self._run("_double_batch", lambda xs: (time.sleep(1.5), [2 * x for x in xs])[1], xs)

    handle = serve.run(Slow.bind(), name="gate", route_prefix=None)
    try:
        first = handle.double.remote(0)
        deadline = time.monotonic() + 30
        while handle.stats.remote().result()["double"]["batches"] == 0:  # the first batch is running
            assert time.monotonic() < deadline
            time.sleep(0.02)
        late = []
        for x in range(1, 9):  # 50 ms apart: each alone would make its own batch
            late.append(handle.double.remote(x))
            time.sleep(0.05)
        assert [first.result()] + [r.result() for r in late] == [2 * x for x in range(9)]
        assert handle.stats.remote().result()["double"]["sizes"] == {1: 1, 8: 1}
    finally:
        serve.delete("gate")


# -- metrics ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_prometheus_metrics(served, ray_local):
    port = ray_local._private.worker.global_worker.node.metrics_export_port
    wanted = ("ray_rabtriever_requests_total{", 'route="/rerank"', 'status="422"')
    deadline = time.monotonic() + 60  # metrics reach the agent every few seconds
    while True:
        lines = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()
        found = [line for line in lines if all(w in line for w in wanted)]
        if found and any(line.startswith("ray_rabtriever_batch_size_bucket") for line in lines):
            break
        assert time.monotonic() < deadline, "no rabtriever metrics exported"
        time.sleep(2)
    assert float(found[0].rsplit(" ", 1)[1]) >= 1
    assert any(line.startswith("ray_rabtriever_request_latency_ms_bucket") for line in lines)


# -- auth and an app without an index ----------------------------------------------------------------------------


@pytest.mark.slow
def test_api_key_and_no_index(served, monkeypatch):
    from ray import serve

    monkeypatch.setenv(serve_module.API_KEY_ENV, "s3cret-key")
    app = serve_module.build_app({"checkpoint": str(served["checkpoint"]), **SETTINGS})
    serve.run(app, name="secure", route_prefix="/secure")
    try:
        url = served["url"] + "/secure"
        body = {"query": "q", "documents": ["a", "b"]}
        assert requests.get(url + "/healthz", timeout=30).status_code == 200  # open, for load balancers
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"}):
            response = requests.post(url + "/rerank", json=body, headers=headers, timeout=30)
            assert response.status_code == 401 and response.json()["error"]["param"] == "authorization"
            assert response.headers["www-authenticate"] == "Bearer"
        assert requests.get(url + "/v1/models", timeout=30).status_code == 401
        auth = {"Authorization": "Bearer s3cret-key"}
        assert requests.post(url + "/rerank", json=body, headers=auth, timeout=30).status_code == 200
        response = requests.post(url + "/search", json={"query": "q"}, headers=auth, timeout=30)
        assert response.status_code == 409 and "index=" in response.json()["error"]["message"]
        # Batching settings come from the config, and Serve's user_config changes them live (reconfigure).
        reranker = _handle("Reranker", "secure")
        assert reranker.stats.remote().result()["settings"] == {
            "max_batch_size": 8,
            "batch_wait_timeout_s": 0.1,
        }
        reranker.reconfigure.remote({"max_batch_size": 2}).result()
        assert reranker.stats.remote().result()["settings"] == {
            "max_batch_size": 2,
            "batch_wait_timeout_s": 0.1,
        }
    finally:
        serve.delete("secure")
    # The first app has no key: no header needed.
    assert _post(served, "/rerank", body).status_code == 200


@pytest.mark.slow
def test_without_a_key_build_app_warns_and_auth_key_refuses_to_start(served, monkeypatch, caplog):
    monkeypatch.delenv(serve_module.API_KEY_ENV, raising=False)
    monkeypatch.setattr(serve_logger, "handlers", [*serve_logger.handlers, caplog.handler])
    args = {"checkpoint": str(served["checkpoint"])}
    serve_module.build_app(args)
    assert "RABTRIEVER_API_KEY is not set: every route is open" in caplog.text and "auth=none" in caplog.text
    caplog.clear()
    serve_module.build_app({**args, "auth": "none"})  # open on purpose: said once, not warned
    assert "auth=none: every route is open" in caplog.text and "WARNING" not in caplog.text
    with pytest.raises(
        ConfigError, match="auth=key but RABTRIEVER_API_KEY is not set where the app is built"
    ):
        serve_module.build_app({**args, "auth": "key"})
    monkeypatch.setenv(serve_module.API_KEY_ENV, "s3cret-key")
    caplog.clear()
    serve_module.build_app({**args, "auth": "key"})
    assert "open" not in caplog.text


@pytest.mark.slow
def test_routes_answer_503_while_the_models_load(served):
    from ray import serve

    @serve.deployment(ray_actor_options={"num_cpus": 0.01}, graceful_shutdown_timeout_s=0.1)
    class StillLoading:  # a model deployment whose constructor has not finished (as while the demo builds)
        def __init__(self):
            time.sleep(3600)

    config = serve_module.load_serve_config({"checkpoint": str(served["checkpoint"])})
    router = serve_module.Router.options(ray_actor_options={"num_cpus": 0.01})
    # serve.run would wait for the stand-ins to finish loading; serve._run(_blocking=False) returns at once.
    serve._run(
        router.bind(StillLoading.bind(), StillLoading.bind(), config),
        _blocking=False,
        name="loading",
        route_prefix="/loading",
    )
    try:
        url = served["url"] + "/loading"
        deadline = time.monotonic() + 60
        while (
            health := requests.get(url + "/healthz", timeout=30)
        ).status_code == 404:  # the Router is starting
            assert time.monotonic() < deadline
            time.sleep(1)
        assert health.status_code == 503 and health.json() == {
            "status": "loading",
            "encoder": False,
            "reranker": False,
        }
        response = requests.post(url + "/rerank", json={"query": "q", "documents": ["a"]}, timeout=30)
        assert response.status_code == 503 and response.json()["error"]["type"] == "loading"
        assert response.headers["retry-after"] == "30"
    finally:
        serve.delete("loading")


# -- replica deaths -----------------------------------------------------------------------------------------------


class _DyingEncoder:
    """An Encoder handle whose replica dies during the first ``deaths`` calls (each raises what an in-flight handle
    call raises then, ActorDiedError). Its retry path finds a replica at once, or, without ``replica_free``, waits
    as Serve's handle does while the only replica's replacement loads."""

    deployment_name = "Encoder"

    def __init__(self, deaths: int, replica_free: bool = True, error: Exception | None = None):
        from ray.exceptions import ActorDiedError

        self.deaths, self.replica_free, self.error, self.calls = (
            deaths,
            replica_free,
            error or ActorDiedError(),
            0,
        )

    @property
    def rerank(self):  # handle.rerank, the method's handle
        return self

    async def remote(self, query: str, documents: list[str], max_tokens_per_doc: int | None = None) -> dict:
        self.calls += 1
        if self.calls <= self.deaths:
            raise self.error
        return {
            "scores": [0.5] * len(documents),
            "query_truncated": False,
            "documents_truncated": [False] * len(documents),
            "tokens": 2,
        }

    @contextlib.asynccontextmanager
    async def choose_replica(self, *args):
        if not self.replica_free:
            await asyncio.sleep(3600)
        yield "a live replica"

    def dispatch(self, replica, *args):
        return self.remote(*args)


def _router(encoder, **settings):
    """A Router over ``encoder`` (both models taken as loaded), outside Serve: its FastAPI app runs in process."""
    config = serve_module.load_serve_config({"checkpoint": "unused", **settings})
    router = serve_module.Router.func_or_class.__mro__[1](
        encoder, None, config
    )  # the class under @serve.ingress
    router._loaded = True  # the models' readiness is Serve's status, which this test has no app for
    return router


def _rerank_through_the_router(encoder, router=None, query="q", receive=None, **settings) -> tuple[int, dict, dict]:
    """POST /rerank through the Router's FastAPI app (ASGI, in process) over ``encoder``: status, headers, body.
    ``receive``: the ASGI receive callable (default: the whole body at once)."""
    from rabtriever_ray.serve.http import http_api

    router = router or _router(encoder, **settings)
    body = json.dumps({"query": query, "documents": ["a"]}).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/rerank", "raw_path": b"/rerank", "root_path": "", "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent = []

    async def whole_body():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(http_api(router)(scope, receive or whole_body, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, json.loads(b"".join(m.get("body", b"") for m in sent[1:]))


def test_a_call_whose_replica_died_is_retried_once_then_503_model_restarted():
    encoder = _DyingEncoder(deaths=1)  # another replica takes the retry
    status, _, body = _rerank_through_the_router(encoder)
    assert status == 200 and body["results"] == [{"index": 0, "relevance_score": 0.5}] and encoder.calls == 2
    encoder, started = _DyingEncoder(1, replica_free=False), time.monotonic()
    status, headers, body = _rerank_through_the_router(encoder, replica_retry_wait_s=0.2)  # no replica in time
    assert status == 503 and headers["retry-after"] == "10", body
    assert body["error"]["type"] == "model_restarted" and "Encoder model restarted" in body["error"]["message"]
    assert encoder.calls == 1 and time.monotonic() - started < 2.2
    # A call that failed for another reason is not retried: it is the JSON 500 of any unhandled error.
    encoder = _DyingEncoder(deaths=1, error=ValueError("no index is configured"))
    status, _, body = _rerank_through_the_router(encoder)
    assert status == 500 and body["error"]["type"] == "server_error" and encoder.calls == 1


def test_a_request_that_kills_two_replicas_is_answered_500_and_refused_when_sent_again():
    encoder = _DyingEncoder(deaths=2)  # the retry's replica dies too: a query of death
    router = _router(encoder)
    status, headers, body = _rerank_through_the_router(encoder, router)
    assert status == 500 and "retry-after" not in headers and encoder.calls == 2, body
    assert body["error"]["type"] == "replica_died" and "killed two Encoder replicas" in body["error"]["message"]
    # Sent again, it is refused before any replica sees it; other requests are served.
    status, _, body = _rerank_through_the_router(encoder, router)
    assert status == 500 and body["error"]["type"] == "replica_died" and encoder.calls == 2
    status, _, body = _rerank_through_the_router(encoder, router, query="another query")
    assert status == 200 and encoder.calls == 3


class _HungEncoder(_DyingEncoder):
    async def remote(self, *args):
        self.calls += 1
        await asyncio.sleep(3600)


def test_deadlines_a_hung_model_is_a_504_and_a_slow_body_a_408():
    started = time.monotonic()
    status, _, body = _rerank_through_the_router(_HungEncoder(deaths=0), model_timeout_s=0.3)
    assert status == 504 and body["error"]["type"] == "model_timeout" and "model_timeout_s=0.3" in str(body)
    assert time.monotonic() - started < 3

    async def stalled():  # the headers came; the body never does
        await asyncio.sleep(3600)

    encoder, started = _DyingEncoder(deaths=0), time.monotonic()
    status, _, body = _rerank_through_the_router(encoder, receive=stalled, body_timeout_s=0.3)
    assert status == 408 and body["error"]["type"] == "body_timeout" and encoder.calls == 0, body
    assert time.monotonic() - started < 3


def test_a_stuck_model_thread_fails_the_health_check():
    from rabtriever_ray.serve.batching import BatchedModel

    model = BatchedModel()
    model._hung_after_s, model._batch_started = 240.0, None
    model.check_health()  # idle
    model._batch_started = time.monotonic() - 10
    model.check_health()  # a batch running for a while
    model._batch_started = time.monotonic() - 300
    with pytest.raises(RuntimeError, match="model thread is stuck"):
        model.check_health()


def test_healthz_reads_serves_status_once_for_many_callers(monkeypatch):
    from rabtriever_ray.serve import router as router_module

    reads = []

    def status():
        reads.append(1)
        time.sleep(0.05)
        return types.SimpleNamespace(applications={})

    monkeypatch.setattr(router_module.serve, "status", status)
    monkeypatch.setattr(
        router_module.serve, "get_replica_context", lambda: types.SimpleNamespace(app_name="rabtriever")
    )
    router = _router(types.SimpleNamespace(deployment_name="Encoder"))
    router.reranker = types.SimpleNamespace(deployment_name="Reranker")

    async def many():
        return await asyncio.gather(*[router._models_ready() for _ in range(50)])

    answers = asyncio.run(many())
    assert reads == [1] and answers[0] == {"encoder": False, "reranker": False}


@pytest.mark.parametrize(
    "host, auth, key, refused",
    [
        ("127.0.0.1", "auto", None, False),
        ("localhost", "auto", None, False),
        ("::1", "auto", None, False),
        ("0.0.0.0", "auto", None, True),
        ("10.1.2.3", "auto", None, True),
        ("my-host", "auto", None, True),
        ("0.0.0.0", "auto", "digest", False),
        ("0.0.0.0", "none", None, False),
    ],
)
def test_open_routes_are_refused_on_a_non_loopback_address_unless_auth_none(host, auth, key, refused):
    from rabtriever_ray.serve.router import check_exposure

    if refused:
        with pytest.raises(ConfigError, match="RABTRIEVER_API_KEY is not set.*auth=none"):
            check_exposure(auth, key, host)
    else:
        check_exposure(auth, key, host)


# -- configuration and the no-argument default --------------------------------------------------------------------


def test_builder_args_from_the_command_line_and_from_yaml_agree():
    cli = serve_module.load_serve_config({"encoder.num_gpus": "0.5", "max_batch_size": "4", "index": "None"})
    nested = serve_module.load_serve_config(
        {"encoder": {"num_gpus": 0.5}, "max_batch_size": 4, "index": None}
    )
    assert cli == nested and cli.encoder.num_gpus == 0.5 and cli.max_batch_size == 4
    with pytest.raises(ConfigError, match="max_batch_sise"):
        serve_module.load_serve_config({"max_batch_sise": "4"})
    with pytest.raises(ConfigError, match="index= needs checkpoint="):
        serve_module.build_app({"index": "runs/some_index"})
    from rabtriever_ray.serve.application import deployment_options

    scaled = deployment_options(serve_module.load_serve_config({"encoder.max_replicas": "3"}).encoder, 128)
    assert scaled["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 8.0,
    }
    assert scaled["max_ongoing_requests"] == 128 and "num_replicas" not in scaled


@pytest.mark.slow
def test_no_arguments_serve_the_demo_from_the_cache(served, tmp_path, monkeypatch, caplog):
    from ray.serve import Application

    assert isinstance(serve_module.app, Application)
    monkeypatch.setenv("RABTRIEVER_CACHE", str(tmp_path))
    checkpoint, index = serve_module.demo_paths([])
    assert (checkpoint, index) == (tmp_path / "serve-demo/distill/checkpoint", tmp_path / "serve-demo/index")
    assert serve_module.demo_paths(["epochs=1"])[0] != checkpoint  # other overrides, another demo
    # Serve's logger does not propagate to the root logger, where caplog listens.
    monkeypatch.setattr(serve_logger, "handlers", [*serve_logger.handlers, caplog.handler])
    serve_module.build_app({})
    assert f"demo checkpoint {checkpoint} and index {index} will be built on first start" in caplog.text
    # Once both exist, starts reuse them: nothing is built (run_distill and build_index would fail here).
    shutil.copytree(served["checkpoint"], checkpoint)
    shutil.copytree(served["index"], index)
    monkeypatch.setattr("rabtriever_ray.distill.run_distill", lambda *a, **k: pytest.fail("rebuilt the demo"))
    monkeypatch.setattr("rabtriever_ray.index.build_index", lambda *a, **k: pytest.fail("rebuilt the index"))
    assert serve_module.ensure_demo([]) == (checkpoint, index)
    caplog.clear()
    serve_module.build_app({})
    assert f"serving the demo checkpoint {checkpoint}" in caplog.text


def test_cluster_serve_yaml_deploys_this_app(monkeypatch):
    monkeypatch.delenv("RABTRIEVER_API_KEY", raising=False)
    from ray.serve.schema import ServeDeploySchema

    path = ROOT / "cluster" / "serve.yaml"
    text = path.read_text()
    assert text.startswith("# serve deploy cluster/serve.yaml")
    config = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (application,) = config.applications
    assert application.import_path == "rabtriever_ray.serve:build_app"
    assert application.args["auth"] == "key"  # a cluster never serves open by accident
    with pytest.raises(ConfigError, match="auth=key but RABTRIEVER_API_KEY is not set"):
        serve_module.build_app(application.args)
    monkeypatch.setenv(serve_module.API_KEY_ENV, "s3cret-key")
    serve_module.build_app(application.args)  # the args are valid ServeConfig keys
    assert {d.name for d in application.deployments} <= {"Encoder", "Reranker", "Router"}
