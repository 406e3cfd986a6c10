"""Score candidate (query, document) pairs with the teacher on Ray Data and write Parquet.

    python jobs/score_teacher.py --data ../shared/datasets/esconv_strategy_dev --split dev --out runs/scores \
        --teacher configs/teacher/esconv_strategy.yaml --candidates all --max-queries 20
    python jobs/score_teacher.py --config configs/score_teacher/esconv_strategy.yaml [key=value ...]

Connects to a running cluster when RAY_ADDRESS is set (as under `ray job submit`), else starts local Ray. OUT gets
data/*.parquet (schema in rabtriever_ray/pipeline.py), manifest.json and, with --on-bad-row skip, rejects.jsonl;
the job ends with the teacher's sanity report (rabtriever_ray/sanity.py: flat scores, ties, one document first).
--config is this job's YAML (ScoreTeacherConfig); each flag sets the key of the same name (--model M is
--teacher M); trailing key=value arguments override any key (teacher.prompt.max_doc_tokens=256).
"""

from __future__ import annotations

import json

from rabtriever_ray.config import ScoreTeacherConfig, parse_job_args
from rabtriever_ray.runtime import run_job
from rabtriever_ray.sanity import format_sanity
from rabtriever_ray.teacher_scores import write_teacher_scores


def main(argv: list[str] | None = None) -> dict:
    config = parse_job_args(ScoreTeacherConfig, argv, __doc__, aliases={"--model": "teacher"})
    manifest = write_teacher_scores(config)
    summary = {
        k: manifest[k] for k in ("rows", "queries", "documents", "truncated", "elapsed_s", "pairs_per_s")
    }
    print(json.dumps({"out": config.out, **summary, "rejected_rows": manifest["rejected_rows"]}, indent=2))
    print("\n" + format_sanity(manifest["sanity"]))
    return manifest


if __name__ == "__main__":
    run_job(main)
