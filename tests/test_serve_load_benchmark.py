"""benchmarks/serve_load.py as a smoke run: the tiny app, batching on and off, every workload measured."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "serve_load.py"
WORKLOADS = {
    "rerank_student",
    "rerank_student_indexed",
    "rerank_teacher",
    "search_student",
    "rerank_student_distinct",
}


@pytest.mark.slow  # benchmarks/serve_load.py as a subprocess: Ray Serve, twice
def test_smoke_run_measures_every_cell_and_the_batches(tmp_path):
    out = tmp_path / "serve_load.json"
    argv = ["--model", "tiny-random-llama", "--clients", "1,4", "--requests", "8", "--queries", "4"]
    argv += ["--app", "batch_wait_timeout_s=0.02"]  # builder args reach both runs' deployments
    argv += ["--workloads", ",".join(sorted(WORKLOADS))]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RABTRIEVER_API_KEY")}
    result = subprocess.run(
        [sys.executable, str(_SCRIPT), *argv, "--max-seconds", "60", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())

    cells = {(c["batching"], c["workload"], c["clients"]): c for c in report["cells"]}
    assert set(cells) == {(m, w, n) for m in ("on", "off") for w in WORKLOADS for n in (1, 4)}
    for cell in cells.values():
        assert cell["errors"] == 0 and cell["requests"] == 8, cell
        assert cell["throughput_rps"] > 0 and cell["p50_ms"] <= cell["p95_ms"] <= cell["p99_ms"]
    assert report["errors"] == 0
    assert set(report["ratios"]) == {
        "rerank_student_throughput_batching_on_over_off_4_clients",
        "rerank_student_indexed_throughput_batching_on_over_off_4_clients",
        "rerank_student_distinct_throughput_batching_on_over_off_4_clients",
        "search_student_p50_over_rerank_teacher_p50_1_client",
    }
    # Batching off means one request per model call; on, the replicas saw and counted the requests.
    for mode in ("on", "off"):
        encoder = report["batch_stats"][mode]["Encoder"]
        assert encoder["settings"] == {
            "max_batch_size": 16 if mode == "on" else 1,
            "batch_wait_timeout_s": 0.02,
        }
        # /search (first stage for the bodies, then search_student) and the three student /rerank workloads.
        assert encoder["rerank"]["requests"] == 3 * 2 * 8
        assert encoder["search"]["requests"] == 4 + 2 * 8
    assert report["batch_stats"]["off"]["Encoder"]["rerank"]["max_batch_size"] == 1
    assert "largest batch per method" in result.stdout
    assert report["app_args"] == {"batch_wait_timeout_s": "0.02"}


def test_bad_arguments_fail_before_anything_starts(tmp_path):
    for argv, message in [
        (["--model", str(tmp_path)], f"--model {tmp_path}: not tiny-random-llama and no config.json"),
        (
            ["--model", "tiny-random-llama", "--app", "max_batch_size"],
            "--app 'max_batch_size': expected KEY=VALUE",
        ),
        (
            ["--model", "tiny-random-llama", "--app", "max_batch_sise=4"],
            "--app: command line: unknown config key 'max_batch_sise'",
        ),
        (
            ["--model", "tiny-random-llama", "--workloads", "rerank_everything"],
            "unknown ['rerank_everything']",
        ),
        (
            ["--url", "http://127.0.0.1:9", "--app", "max_batch_size=2"],
            "--app configures the app this script",
        ),
        (["--url", "http://127.0.0.1:9", "--kill-replica"], "--kill-replica and --hostile measure the app this"),
        (["--url", "http://127.0.0.1:9", "--hostile"], "--kill-replica and --hostile measure the app this"),
    ]:
        result = subprocess.run(
            [sys.executable, str(_SCRIPT), *argv, "--out", str(tmp_path / "out.json")],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2 and message in result.stderr, (argv, result.stderr[-2000:])
    assert not (tmp_path / "out.json").exists()


def test_hostile_bodies_sit_at_the_limits():
    """The hostile mode's bodies: the maximal ones within every limit, the others just past one."""
    from helpers import load_script

    from rabtriever_ray.config import ServeConfig

    bench, limits = load_script("benchmarks/serve_load.py"), ServeConfig()
    bodies = bench._hostile_bodies(limits.max_documents, limits.max_text_bytes, limits.max_request_bytes)
    rerank = json.loads(bodies["max_rerank_student"])
    assert len(rerank["documents"]) == limits.max_documents
    assert all(limits.max_text_bytes - 64 < len(d.encode()) <= limits.max_text_bytes for d in rerank["documents"])
    assert len(set(rerank["documents"])) == limits.max_documents
    for case in ("max_rerank_student", "max_rerank_teacher", "max_embeddings", "bad_items"):
        assert len(bodies[case]) <= limits.max_request_bytes, case
    assert len(json.loads(bodies["bad_items"])["input"]) > 2_000_000 - 100
    assert len(bodies["oversized"]) > limits.max_request_bytes
