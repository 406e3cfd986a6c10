"""The main job against real Ray clusters: `ray start --head` + `ray job submit`, and a two-node cluster.

Each test runs its cluster in separate processes, so it never touches the session's in-process local Ray.
"""

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from helpers import TINY_DISTILL, free_port

# Slow: a `ray start --head` cluster and a two-node cluster, each running a distillation.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# The unit-test distillation, a little smaller (each test here also starts its own cluster).
TINY = [*TINY_DISTILL, "max_train_queries=16", "max_val_queries=6", "epochs=2"]


@pytest.fixture
def ray_head(tmp_path):
    """`ray start --head --block` in its own process group; yields the dashboard (job server) address."""
    if shutil.which("ray") is None:
        pytest.skip("the `ray` CLI is not on PATH")
    dashboard, gcs_port = free_port(), free_port()
    # The cluster and its CLI clients share one token (Ray enables token authentication by default).
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    log = open(tmp_path / "ray_head.log", "w")  # noqa: SIM115 - closed below
    head = subprocess.Popen(
        [
            "ray",
            "start",
            "--head",
            "--block",
            f"--port={gcs_port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--disable-usage-stats",
            # Every listening port chosen free, so the head runs beside any other Ray on this machine.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            f"--ray-client-server-port={free_port()}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            probe = subprocess.run(
                ["ray", "job", "list", "--address", address],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
            )
            if probe.returncode == 0:
                break
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"ray head did not start: {(tmp_path / 'ray_head.log').read_text()[-2000:]}"
                )
            time.sleep(2)
        yield address, env
    finally:
        # The head's processes share its process group: stop them all (never `ray stop`, which would also stop
        # every other Ray on this machine).
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()
        # `ray start` records its head in Ray's temp folder; left there, a later plain ray.init() would try to join
        # the dead head instead of starting its own local Ray.
        current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        if current.is_file() and current.read_text().strip().endswith(f":{gcs_port}"):
            current.unlink()


def test_ray_job_submit_runs_the_distillation(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "job_run"
    deadline = time.monotonic() + 120
    while True:  # the job agent comes up a little after the job server answers
        submit = subprocess.run(
            [
                "ray",
                "job",
                "submit",
                "--address",
                address,
                "--working-dir",
                str(ROOT),
                "--",
                "python",
                "jobs/distill.py",
                *TINY,
                "name=job_submit",
                f"out_dir={out}",
            ],
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        if "No available agent" not in submit.stderr or time.monotonic() > deadline:
            break
        time.sleep(3)
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout and "Rabtriever agrees with the teacher" in submit.stdout
    report = json.loads((out / "report.json").read_text())
    assert [h["epoch"] for h in report["history"]] == [0, 1]
    assert (out / "checkpoint" / "student.safetensors").is_file()


MULTI_NODE = textwrap.dedent(
    """
    import json, sys
    import ray
    from ray.cluster_utils import Cluster
    from rabtriever_ray.config import DistillConfig, load_config
    from rabtriever_ray.distill import run_distill

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
    report = run_distill(load_config(DistillConfig, None, sys.argv[1:]))
    print("RESULT " + json.dumps({"nodes": nodes, "history": report["history"]}))
    ray.shutdown()
    cluster.shutdown()
    """
)


def test_two_nodes_spread_training_workers(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            MULTI_NODE,
            *TINY,
            "name=multi_node",
            "placement_strategy=SPREAD",
            f"out_dir={tmp_path / 'multi_node'}",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(x for x in result.stdout.splitlines() if x.startswith("RESULT "))
    outcome = json.loads(line.removeprefix("RESULT "))
    assert len(outcome["nodes"]) == 2
    history = outcome["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    # The two training workers ran on the two different nodes of the cluster.
    assert sorted(history[-1]["worker_nodes"]) == outcome["nodes"]
