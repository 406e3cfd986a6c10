"""The teacher-scores folder: what ``jobs/score_teacher.py`` writes and distillation reads.

A folder holds ``data/*.parquet`` (the teacher stage's rows, `pipeline.output_schema`), ``manifest.json`` (written
last: it marks the folder complete; data, split, candidates, sample, teacher and prompt, counts, the teacher's
``sanity`` figures and warnings (`sanity.teacher_sanity`), timing, schema) and,
when rows were skipped, ``rejects.jsonl``.

- `write_teacher_scores`: read a BEIR folder, build the pairs, score them on teacher actors and write the folder.
- `write_scored_pairs`: write pairs already scored in this process (`pipeline.score_pairs`) the same way.
- `read_teacher_scores`, `read_scores_for`: read a finished folder as a Ray Dataset, checked against its schema and
  against the teacher that is to use it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .config import ScoreTeacherConfig, TeacherConfig, actor_range, prompt_differences, to_dict
from .io import MANIFEST
from .pipeline import (
    SchemaError,
    check_schema,
    output_schema,
    pairs_dataset,
    sharing_order,
    teacher_stage,
)
from .prompts import PromptBuilder


def read_teacher_scores(path: str | Path, hidden_size: int | None = None):
    """Read a finished ``jobs/score_teacher.py`` output as a Ray Dataset, checking manifest and schema."""
    import pyarrow.parquet as pq
    import ray
    import ray.data

    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise SchemaError(f"{path}: no {MANIFEST}; not a finished jobs/score_teacher.py output")
    manifest = json.loads(manifest_path.read_text())
    files = sorted((path / "data").glob("*.parquet"))
    if not files:
        raise SchemaError(f"{path}/data: no Parquet files")
    check_schema(pq.read_schema(files[0]), hidden_size, source=str(files[0]))
    # One light read task per file (a quarter CPU): beside training workers that hold most CPUs, Ray Data's own
    # Parquet reader would wait for a whole free CPU for its file listing.
    read = ray.remote(num_cpus=0.25)(pq.read_table)
    # Absolute paths: Ray workers need not share this process's working directory.
    return ray.data.from_arrow_refs([read.remote(str(f.resolve())) for f in files]), manifest


def summarize(path: str | Path) -> dict[str, Any]:
    """Row, query, document and truncation counts of written Parquet files, and the teacher's ``sanity`` figures
    (`sanity.teacher_sanity`); read from a few columns only."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .sanity import teacher_sanity

    table = pq.ParquetDataset(str(path)).read(
        columns=["query_id", "doc_id", "teacher_score", "truncated", "query_tokens", "doc_tokens"]
    )
    return {
        "rows": table.num_rows,
        "queries": pc.count_distinct(table.column("query_id")).as_py(),
        "documents": pc.count_distinct(table.column("doc_id")).as_py(),
        "truncated": int(np.sum(table.column("truncated").to_numpy(zero_copy_only=False))),
        "query_tokens": int(np.sum(table.column("query_tokens").to_numpy())),
        "doc_tokens": int(np.sum(table.column("doc_tokens").to_numpy())),
        "sanity": teacher_sanity(table),
    }


def _finish_scores_folder(
    staging: Path, config: ScoreTeacherConfig, n_pairs: int, rejects: list, elapsed: float
) -> dict[str, Any]:
    """Check the Parquet files written under ``staging/data`` (row count, schema) and write the rejects and the
    manifest (last: it marks the folder complete); returns the manifest."""
    import pyarrow.parquet as pq
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .config import to_dict
    from .data import reject_counts, write_rejects
    from .io import write_json_atomic

    # Counted in a task on this node (where the folder is): the driver never reads the written rows.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    count_task = ray.remote(summarize).options(num_cpus=0.25, scheduling_strategy=here)
    counts = ray.get(count_task.remote(str(staging / "data")))
    if counts["rows"] != n_pairs:
        raise RuntimeError(f"wrote {counts['rows']} rows for {n_pairs} candidate pairs")
    if rejects:
        write_rejects(rejects, staging / "rejects.jsonl")
    hidden_size = check_schema(pq.read_schema(next((staging / "data").glob("*.parquet"))))
    manifest = {
        "format": "rabtriever-teacher-scores/1",
        "data": str(config.data),
        "split": config.split,
        "candidates": config.candidates,
        "training": config.training,
        "max_queries": config.max_queries,
        "seed": config.seed,
        "teacher": to_dict(config.teacher),
        "prompt_template": PromptBuilder.template_text(config.teacher.prompt),
        "hidden_size": hidden_size,
        **counts,
        "rejected_rows": reject_counts(rejects),
        "elapsed_s": round(elapsed, 2),
        "pairs_per_s": round(counts["rows"] / elapsed, 2),
        "schema": {f.name: str(f.type) for f in output_schema(hidden_size)},
    }
    write_json_atomic(staging / MANIFEST, manifest)
    return manifest


def write_scored_pairs(scored: pa.Table, config: ScoreTeacherConfig, elapsed: float) -> dict[str, Any]:
    """Write pairs already scored in this process (`score_pairs`) as a ``jobs/score_teacher.py`` folder at
    ``config.out`` (atomically), described by ``config``; returns the manifest."""
    import pyarrow.parquet as pq

    from .io import atomic_dir

    with atomic_dir(config.out, config.overwrite) as staging:
        (staging / "data").mkdir()
        pq.write_table(scored, staging / "data" / "part-00000.parquet")
        return _finish_scores_folder(staging, config, len(scored), [], elapsed)


def write_teacher_scores(
    config: ScoreTeacherConfig, crash_once: tuple[str, int] | None = None
) -> dict[str, Any]:
    """Read a BEIR folder, build candidate pairs, score them with teacher actors and write ``config.out``
    atomically (every option: `ScoreTeacherConfig`; ``crash_once`` is `teacher_stage`'s test hook).

    ``out`` receives ``data/*.parquet`` (schema above), ``manifest.json`` and, when rows were skipped,
    ``rejects.jsonl``. Returns the manifest.
    """
    import dataclasses
    import time

    from .data import build_pairs, read_beir, read_beir_dataset, run_pairs
    from .io import atomic_dir
    from .models import resolve_spec
    from .runtime import init_ray

    start = time.perf_counter()
    # Teacher actors need not run in this working directory: a relative model path is made absolute here.
    teacher = dataclasses.replace(config.teacher, model=resolve_spec(config.teacher.model))
    config = dataclasses.replace(config, teacher=teacher)
    streamed = config.candidates_spec.is_run
    min_actors, max_actors = actor_range(config.actors)
    with atomic_dir(config.out, config.overwrite) as staging:  # refuses before any expensive work
        if streamed:
            # A run file: read, validate and join in Ray Data; the driver holds counts, not the corpus.
            init_ray()
            data = read_beir_dataset(config.data, config.split, on_bad_row=config.on_bad_row)  # type: ignore[arg-type]
            blocks, pair_counts = run_pairs(
                data,
                config.candidates,
                training=config.training,
                max_queries=config.max_queries,
                seed=config.seed,
                min_partitions=2 * max_actors,
            )
            n_pairs = pair_counts["pairs"]
        else:
            data = read_beir(config.data, config.split, on_bad_row=config.on_bad_row)  # type: ignore[arg-type]
            pairs = build_pairs(
                data,
                config.candidates,
                max_queries=config.max_queries,
                seed=config.seed,
                training=config.training,
            )
            n_pairs = len(pairs)
        if n_pairs == 0:
            raise ValueError(
                f"{config.data}: no candidate pairs (split {config.split!r}, candidates {config.candidates!r})"
            )
        if not streamed:
            init_ray()  # after the input is known to be good: bad input fails fast, without starting Ray
            # Training pairs in blocks of whole candidate lists, one actor call per block, so that each written
            # file holds whole lists (what distillation batches need); other pairs in the prompt's sharing order.
            blocks = (
                pairs_dataset(pairs, config.batch_size, whole_queries=True)
                if config.training
                else pairs_dataset(sharing_order(pairs, config.teacher))
            )
        stage = teacher_stage(
            blocks,
            config.teacher,
            actors=(min_actors, max_actors),
            gpus_per_actor=config.gpus_per_actor,
            cpus_per_actor=config.cpus_per_actor,
            batch_size=None if config.training else config.batch_size,
            crash_once=crash_once,
        )
        stage.write_parquet(str(staging / "data"))
        return _finish_scores_folder(staging, config, n_pairs, data.rejects, time.perf_counter() - start)


def _same_model(a: str, b: str) -> bool:
    """Two model specs name the same model: equal, or the same directory or file written two ways."""
    return a == b or (Path(a).exists() and Path(b).exists() and Path(a).resolve() == Path(b).resolve())


def read_scores_for(teacher: TeacherConfig, path: str):
    """A teacher-scores folder as a Dataset and its manifest, checked against the ``teacher`` that is to use them
    before anything runs: hidden size, model spec and every prompt field."""
    from .models import model_hidden_size

    dataset, manifest = read_teacher_scores(path, hidden_size=model_hidden_size(teacher.model))
    scored_by = manifest["teacher"]
    if not _same_model(scored_by["model"], teacher.model):
        raise SchemaError(f"{path}: scored by teacher {scored_by['model']!r}, but teacher={teacher.model!r}")
    differ = prompt_differences(scored_by["prompt"], to_dict(teacher.prompt))
    if differ:
        key, scored, current = differ[0]
        raise SchemaError(
            f"{path}: scored with a different prompt (prompt.{key}={scored!r}, this run has {current!r}); "
            "rescore it or align the prompt config"
        )
    return dataset, manifest
