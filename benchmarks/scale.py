"""Scale: wall time and peak memory per stage as the corpus grows, with the tiny model.

    python benchmarks/scale.py --sizes 10000 100000 1000000 --out benchmarks/results/scale.json
    python benchmarks/scale.py --job-sizes 20000 200000 --sizes --out benchmarks/results/scale_job.json

For each size N a seeded corpus is generated (N documents of about 600 bytes of pseudo-words, N/100 queries of
about 60 bytes, one judged positive each, and a TREC run of 20 candidates per query: N/5 pairs), and a fresh
process runs the stages on a fresh local Ray:

  read        `read_beir_dataset`: every file read and validated in Ray tasks, ids checked across them
  candidates  `run_pairs` in training mode: the run joined with qrels, queries and corpus in Ray Data
  teacher     `teacher_stage` over those pairs (whole lists per block) with the tiny teacher, written as Parquet
  distill     `run_distill`, one epoch, one worker, the teacher live: training pairs from the run (streamed),
              validation on 100 queries' run candidates (`run_subset`)
  index       `build_index` (the index job): the corpus read again, encoded by a student on an actor pool into
              Parquet, FAISS (flat) built file by file in a task
  search      `Searcher`: 100 queries, top 10, two-stage above 10,000 documents (a per-query cost: left out of
              the per-document comparison)

Per stage it records wall seconds, seconds per 1,000 documents, the driver's peak RSS and the largest Ray worker's
peak RSS (both sampled every 0.2 s with psutil; workers are the processes of this run's own local Ray). ``--job-sizes`` runs ``jobs/score_teacher.py`` with run-file
candidates as a subprocess per size and records its peak RSS (the driver of the real job, ``ru_maxrss``).

Run it on a quiet machine: the times are wall-clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
QUERIES_PER_DOC = 0.01
CANDIDATES = 20
TINY_TEACHER = {"model": "tiny-random-llama", "prompt": {"max_doc_tokens": 64, "max_query_tokens": 24}}


def generate(root: Path, n_docs: int, seed: int = 0) -> Path:
    """A BEIR folder (corpus, queries, qrels/train.tsv) and ``run.trec`` for ``n_docs`` documents; returns the run."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "ze", "po", "da", "fe", "gu", "hi", "jo"]
    vocab = np.array(
        ["".join(rng.choice(syllables, size=rng.integers(2, 5))) for _ in range(5000)], dtype=object
    )
    weights = 1.0 / np.arange(1, len(vocab) + 1)  # Zipf-like word frequencies
    weights /= weights.sum()
    (root / "qrels").mkdir(parents=True, exist_ok=True)
    with open(root / "corpus.jsonl", "w") as handle:
        for start in range(0, n_docs, 10_000):
            rows = min(10_000, n_docs - start)
            words = vocab[rng.choice(len(vocab), size=(rows, 95), p=weights)]
            lengths = rng.integers(70, 95, size=rows)
            for i in range(rows):
                text = " ".join(words[i, : lengths[i]])
                title = " ".join(words[i, :3])
                handle.write(json.dumps({"_id": f"d{start + i}", "title": title, "text": text}) + "\n")
    n_queries = max(10, int(n_docs * QUERIES_PER_DOC))
    positives = rng.integers(0, n_docs, size=n_queries)
    with open(root / "queries.jsonl", "w") as q, open(root / "qrels" / "train.tsv", "w") as r:
        r.write("query-id\tcorpus-id\tscore\n")
        for i, doc in enumerate(positives):
            words = vocab[rng.choice(len(vocab), size=10, p=weights)]
            q.write(json.dumps({"_id": f"q{i}", "text": " ".join(words)}) + "\n")
            r.write(f"q{i}\td{doc}\t1\n")
    run = root / "run.trec"
    with open(run, "w") as handle:
        for i, doc in enumerate(positives):
            others = rng.integers(0, n_docs, size=CANDIDATES - 1)
            ranked = list(dict.fromkeys([int(doc), *others.tolist()]))
            rng.shuffle(ranked)
            for rank, d in enumerate(ranked, start=1):
                handle.write(f"q{i} Q0 d{d} {rank} {1.0 / rank:.4f} gen\n")
    return run


class PeakRSS:
    """Peak RSS of this process and of the largest Ray worker on the host, sampled in a thread."""

    def __init__(self, every: float = 0.2):
        import psutil

        self.psutil, self.every = psutil, every
        self.me = psutil.Process()
        self.driver = self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.driver = max(self.driver, self.me.memory_info().rss)
            for proc in self.me.children(recursive=True):  # this process's Ray (raylet, workers) only
                try:
                    command = " ".join(proc.cmdline())
                    if command.startswith("ray::") or "default_worker.py" in command:
                        self.worker = max(self.worker, proc.memory_info().rss)
                except self.psutil.Error:  # a worker that just exited
                    continue
            self._stop.wait(self.every)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def one_size(n_docs: int, workdir: Path, cpus: int) -> dict:
    """Every stage at one size, in this process (run as a subprocess per size by `main`)."""
    import ray
    import torch

    from rabtriever_ray.config import (
        DistillConfig,
        IndexConfig,
        PromptConfig,
        StudentConfig,
        TeacherConfig,
        load_config,
        to_dict,
    )
    from rabtriever_ray.data import read_beir_dataset, run_pairs
    from rabtriever_ray.distill import run_distill
    from rabtriever_ray.index import build_index
    from rabtriever_ray.pipeline import teacher_stage
    from rabtriever_ray.search import Searcher
    from rabtriever_ray.student import Rabtriever
    from rabtriever_ray.teacher import GenerativeReranker

    data = workdir / "data"
    start = time.perf_counter()
    run = generate(data, n_docs)
    generate_s = time.perf_counter() - start
    teacher = TeacherConfig(model=TINY_TEACHER["model"], prompt=PromptConfig(**TINY_TEACHER["prompt"]))
    student = Rabtriever(GenerativeReranker.from_config(teacher, device="cpu"), StudentConfig(proj_dim=16))
    with torch.no_grad():
        for p in student.predictor.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    checkpoint = workdir / "checkpoint"
    student.save_trainable(
        checkpoint, teacher=teacher.model, prompt=to_dict(teacher.prompt), max_batch_tokens=4096
    )

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    stages: dict[str, dict] = {}
    held: dict = {}

    def stage(name: str, fn) -> None:
        with PeakRSS() as peak:
            begin = time.perf_counter()
            held[name] = fn()
            wall = time.perf_counter() - begin
        stages[name] = {
            "wall_s": round(wall, 2),
            "s_per_1k_docs": round(1000 * wall / n_docs, 4),
            "driver_peak_rss_mb": round(peak.driver / 2**20, 1),
            "worker_peak_rss_mb": round(peak.worker / 2**20, 1),
        }
        print(json.dumps({"docs": n_docs, "stage": name, **stages[name]}), flush=True)

    stage("read", lambda: read_beir_dataset(data, "train"))
    stage("candidates", lambda: run_pairs(held["read"], run, training=True, min_partitions=2 * cpus))
    pairs, counts = held["candidates"]

    def score() -> int:
        scored = teacher_stage(pairs, teacher, actors=(1, cpus), cpus_per_actor=1.0, batch_size=None)
        scored.write_parquet(str(workdir / "scores"))
        return sum(1 for _ in (workdir / "scores").glob("*.parquet"))

    stage("teacher", score)

    def distill() -> dict:
        config = load_config(
            DistillConfig,
            None,
            [
                f"data_dir={data}",
                "train_split=train",
                "val_split=train",
                f"candidates={run}",
                f"val_candidates={run}",
                "max_val_queries=100",
                f"teacher={TINY_TEACHER['model']}",
                f"teacher.prompt.max_doc_tokens={TINY_TEACHER['prompt']['max_doc_tokens']}",
                f"teacher.prompt.max_query_tokens={TINY_TEACHER['prompt']['max_query_tokens']}",
                "finetune_teacher=false",
                "cost_queries=0",
                "epochs=1",
                "num_workers=1",
                f"cpus_per_worker={cpus / 2}",
                f"teacher_cpus={cpus / 2}",
                "teacher_actors=1",
                "batch_size=32",
                f"out_dir={workdir / 'distill'}",
            ],
        )
        return run_distill(config)["counts"]

    stage("distill", distill)
    index = workdir / "index"
    stage(
        "index",
        lambda: build_index(IndexConfig(str(checkpoint), str(data), str(index), "flat", actors=f"1:{cpus}")),
    )
    queries = [json.loads(line)["text"] for line in open(data / "queries.jsonl")][:100]
    stage("search", lambda: len(Searcher(checkpoint, index).search(queries, top_k=10)))

    ray.shutdown()
    return {
        "docs": n_docs,
        "queries": held["read"].counts["queries"],
        "pairs": counts["pairs"],
        "corpus_mb": round((data / "corpus.jsonl").stat().st_size / 2**20, 1),
        "generate_s": round(generate_s, 1),
        "stages": stages,
    }


def job_peak(n_docs: int, workdir: Path, cpus: int) -> dict:
    """``jobs/score_teacher.py`` with run-file candidates at one size: wall time and the job process's peak RSS."""
    data = workdir / "data"
    run = generate(data, n_docs)
    command = [
        sys.executable,
        str(ROOT / "jobs" / "score_teacher.py"),
        "--data",
        str(data),
        "--split",
        "train",
        "--out",
        str(workdir / "scores"),
        "--model",
        TINY_TEACHER["model"],
        "--candidates",
        str(run),
        "--actors",
        f"1:{cpus}",
        f"teacher.prompt.max_doc_tokens={TINY_TEACHER['prompt']['max_doc_tokens']}",
        f"teacher.prompt.max_query_tokens={TINY_TEACHER['prompt']['max_query_tokens']}",
        "training=true",
    ]
    env = {**os.environ, "RAY_ADDRESS": ""}
    begin = time.perf_counter()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - begin
    if status != 0:
        raise RuntimeError(f"score_teacher failed at {n_docs} documents:\n{output[-3000:]}")
    manifest = json.loads((workdir / "scores" / "manifest.json").read_text())
    return {
        "docs": n_docs,
        "pairs": manifest["rows"],
        "wall_s": round(wall, 1),
        "driver_peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kilobytes
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--job-sizes", type=int, nargs="*", default=[])
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    parser.add_argument(
        "--workdir", default=None, help="where generated data goes (default: a temporary folder)"
    )
    parser.add_argument("--out", default="benchmarks/results/scale.json")
    parser.add_argument(
        "--one", type=int, default=None, help=argparse.SUPPRESS
    )  # internal: one size, print JSON
    parser.add_argument("--job", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one is not None or args.job is not None:
        workdir = Path(args.workdir)
        result = (
            one_size(args.one, workdir, args.cpus)
            if args.one is not None
            else job_peak(args.job, workdir, args.cpus)
        )
        print("RESULT " + json.dumps(result), flush=True)
        return

    results: dict = {"sizes": [], "jobs": []}
    for flag, sizes, key in (("--one", args.sizes, "sizes"), ("--job", args.job_sizes, "jobs")):
        for n in sizes:
            with tempfile.TemporaryDirectory(dir=args.workdir) as workdir:
                command = [
                    sys.executable,
                    __file__,
                    flag,
                    str(n),
                    "--workdir",
                    workdir,
                    "--cpus",
                    str(args.cpus),
                ]
                proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
                lines = [
                    line
                    for line in proc.stdout.splitlines()
                    if line.startswith("{") or line.startswith("RESULT ")
                ]
                for line in lines:
                    if line.startswith("{"):
                        print(line, flush=True)
                if proc.returncode != 0 or not lines or not lines[-1].startswith("RESULT "):
                    sys.exit(f"size {n} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
                results[key].append(json.loads(lines[-1][len("RESULT ") :]))
    summary = _summary(results["sizes"])
    import ray

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    report = {
        "benchmark": "scale",
        "command": "python " + " ".join(sys.argv),
        "commit": commit.stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": args.cpus, "platform": platform.platform(), "python": platform.python_version()},
        "ray": ray.__version__,
        **results,
        "summary": summary,
    }
    print(json.dumps(summary, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


def _summary(sizes: list[dict]) -> dict:
    """Driver RSS of the largest size over the one before it, and the spread of per-document time per stage."""
    if len(sizes) < 2:
        return {}
    largest, previous = sizes[-1], sizes[-2]
    out: dict = {"driver_rss_ratio": {}, "per_doc_time_spread": {}}
    for name in largest["stages"]:
        if name == "search":  # a fixed 100 queries: its time is per query, not per document
            continue
        out["driver_rss_ratio"][name] = round(
            largest["stages"][name]["driver_peak_rss_mb"] / previous["stages"][name]["driver_peak_rss_mb"], 3
        )
        per_doc = [s["stages"][name]["s_per_1k_docs"] for s in sizes]
        out["per_doc_time_spread"][name] = round(max(per_doc) / min(per_doc), 2)
    return out


if __name__ == "__main__":
    main()
