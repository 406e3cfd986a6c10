"""Score candidate (query, document) pairs with the teacher on Ray Data and write Parquet.

    python jobs/score_teacher.py --data ../shared/datasets/esconv_strategy_dev --split dev --out runs/scores \
        --config configs/teacher/esconv_strategy.yaml --candidates all --max-queries 20

Connects to a running cluster when RAY_ADDRESS is set (as under `ray job submit`), else starts local Ray. OUT gets
data/*.parquet (schema in rabtriever_ray/pipeline.py), manifest.json and, with --on-bad-row skip, rejects.jsonl.
Trailing key=value arguments override the teacher config (e.g. prompt.max_doc_tokens=256).
"""

from __future__ import annotations

import argparse
import json

from rabtriever_ray.config import TeacherConfig, actor_range, load_config
from rabtriever_ray.io import run_job
from rabtriever_ray.pipeline import write_teacher_scores


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    parser.add_argument(
        "--split", default=None, help="qrels split; its queries are scored (default: all queries)"
    )
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--config", default=None, help="teacher config YAML (configs/teacher/*.yaml)")
    parser.add_argument("--model", default=None, help="teacher model spec (overrides the config's model)")
    parser.add_argument("--candidates", default="all", help="all | bm25:K | path to a TREC run file")
    parser.add_argument(
        "--training", action="store_true", help="add qrel positives missing from the candidates"
    )
    parser.add_argument("--max-queries", type=int, default=None, help="seeded subset of this many queries")
    parser.add_argument("--seed", type=int, default=0, help="seed of the query subset")
    parser.add_argument(
        "--actors", type=actor_range, default=(1, 1), help="teacher actor pool MIN:MAX (default 1:1)"
    )
    parser.add_argument(
        "--gpus-per-actor", type=float, default=None, help="default: 1 when the cluster has GPUs"
    )
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs per teacher actor")
    parser.add_argument("--batch-size", type=int, default=64, help="rows per actor call")
    parser.add_argument(
        "--on-bad-row", choices=["fail", "skip"], default="fail", help="bad input rows: stop or skip"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a finished OUT")
    parser.add_argument("overrides", nargs="*", help="teacher config overrides, key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    overrides = list(args.overrides) + ([f"model={args.model}"] if args.model else [])
    teacher = load_config(TeacherConfig, args.config, overrides)
    manifest = write_teacher_scores(
        args.data,
        args.split,
        args.out,
        teacher,
        candidates=args.candidates,
        max_queries=args.max_queries,
        seed=args.seed,
        training=args.training,
        on_bad_row=args.on_bad_row,
        overwrite=args.overwrite,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        batch_size=args.batch_size,
    )
    summary = {
        k: manifest[k] for k in ("rows", "queries", "documents", "truncated", "elapsed_s", "pairs_per_s")
    }
    print(json.dumps({"out": args.out, **summary, "rejected_rows": manifest["rejected_rows"]}, indent=2))
    return manifest


if __name__ == "__main__":
    run_job(main)
