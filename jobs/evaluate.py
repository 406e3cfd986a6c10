"""Evaluate baselines, the teacher and Rabtriever on a BEIR-layout folder; print a table, write results JSON.

    python jobs/evaluate.py --data ../shared/datasets/esconv_strategy_dev --split dev \
        --methods bm25,minilm,llm-embed,teacher,rabtriever,rabtriever-search --checkpoint runs/esc/checkpoint \
        --teacher configs/teacher/esconv_strategy.yaml --max-queries 300 --out runs/eval_esconv.json
    python jobs/evaluate.py --data ../shared/datasets/scifact --split test --candidates bm25:20 ...
    python jobs/evaluate.py --data ../shared/datasets/arguana --split test --exclude-self ...
    python jobs/evaluate.py --data rabtriever_ray/demo_data --split dev --methods bm25,minilm,minilm-ft \
        --train-split train
    python jobs/evaluate.py --config configs/evaluate/esconv_strategy.yaml [key=value ...]

Methods: frequency, bm25, minilm and minilm-ft (need pip install -e ".[baselines]"), llm-embed, teacher,
rabtriever, rabtriever-search (see rabtriever_ray/evaluate.py). frequency and minilm-ft read the training split
--train-split of --train-data (default: --data); --frequency-split and --frequency-data set the same keys. The
teacher is --teacher: a teacher YAML or a model spec (default model and prompt); the student uses the prompt its
checkpoint records. --config is this job's YAML (EvaluateConfig); each flag sets the key of the same name;
trailing key=value arguments override any key (teacher.prompt.max_doc_tokens=256).
"""

from __future__ import annotations

import json
import logging

from rabtriever_ray.baselines import MissingBaseline
from rabtriever_ray.config import EvaluateConfig, parse_job_args
from rabtriever_ray.evaluate import markdown_table, run_evaluation
from rabtriever_ray.runtime import BAD_INPUT, run_job


def main(argv: list[str] | None = None) -> dict:
    # The flags the frequency prior had before minilm-ft shared its training split.
    aliases = {"--frequency-data": "train_data", "--frequency-split": "train_split"}
    config = parse_job_args(EvaluateConfig, argv, __doc__, aliases=aliases)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    results = run_evaluation(config)
    print(f"{results['dataset']} ({results['split']}), {results['n_queries']} queries\n")
    print(markdown_table(results))
    print("\ntiming (s):", json.dumps({k: round(v["total_s"], 2) for k, v in results["timing"].items()}))
    if config.out:
        print(f"wrote {config.out}")
    return results


if __name__ == "__main__":
    run_job(main, (*BAD_INPUT, MissingBaseline))
