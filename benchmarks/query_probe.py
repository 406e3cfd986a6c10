"""How much of a query the student's query embedding carries, against the query tokens' mean state.

Rabtriever scores a pair from two independent encodings; whatever it knows of a query must be in its query
embedding (`Rabtriever.encode_queries`), read from the prompt with an empty document slot. This benchmark measures how well that embedding tells queries apart, on a BEIR
folder whose queries have one relevant document each (the demo's skills): each validation query is labelled by
its relevant document, and two read-outs learnt on the training queries predict it:

- 1-NN: the label of the nearest training query (cosine of standardised embeddings);
- probe: a linear softmax classifier (Adam, 300 full-batch steps, seeded).

It compares the answer-position state (``last``, Rabtriever's query embedding with ``student.query_mean=false``)
with the mean pre-norm state over the query's own tokens in the same forward (``query_mean``, which the default
query embedding adds). Prints a table and saves JSON.

    python benchmarks/query_probe.py                                   # default model, demo data
    python benchmarks/query_probe.py --model runs/demo/teacher --out benchmarks/results/query_probe_demo_tuned.json
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def _representations(student, texts: list[str]) -> dict[str, torch.Tensor]:
    """``last`` (the answer-position state) and ``query_mean`` for each text, ``[n, d]`` float32, from
    `Rabtriever.encode_queries` with `StudentConfig.query_mean`."""
    with torch.no_grad():
        encoded = student.encode_queries(texts).float()
    return {"last": encoded[:, : student.hidden_size], "query_mean": encoded[:, student.hidden_size :]}


def _read_outs(train: torch.Tensor, y_train: torch.Tensor, val: torch.Tensor, y_val: torch.Tensor, classes: int):
    mean, std = train.mean(0), train.std(0) + 1e-3
    a, b = (train - mean) / std, (val - mean) / std
    nearest = (torch.nn.functional.normalize(b, dim=-1) @ torch.nn.functional.normalize(a, dim=-1).T).argmax(1)
    one_nn = (y_train[nearest] == y_val).float().mean().item()
    torch.manual_seed(0)
    probe = torch.nn.Linear(a.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in range(300):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(a), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        linear = (probe(b).argmax(1) == y_val).float().mean().item()
    return {"1nn_accuracy": round(one_nn, 4), "probe_accuracy": round(linear, 4)}


def main(argv: list[str] | None = None) -> dict:
    from rabtriever_ray.config import StudentConfig, TeacherConfig
    from rabtriever_ray.data import DEMO_DATA, read_beir
    from rabtriever_ray.student import Rabtriever
    from rabtriever_ray.teacher import GenerativeReranker

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="model spec or fine-tuned teacher directory")
    parser.add_argument("--data", default=str(DEMO_DATA), help="BEIR folder, one relevant document per query")
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--val-split", default="dev")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.perf_counter()
    teacher = GenerativeReranker.from_config(TeacherConfig(model=args.model))
    student = Rabtriever(teacher, StudentConfig(query_mean=True)).eval()
    splits = {name: read_beir(args.data, split) for name, split in (("train", args.train_split), ("val", args.val_split))}
    documents = sorted(splits["train"].corpus)
    encoded, labels = {}, {}
    for name, data in splits.items():
        queries = [q for q, docs in data.qrels.items() if sum(g > 0 for g in docs.values()) == 1]
        labels[name] = torch.tensor(
            [documents.index(next(d for d, g in data.qrels[q].items() if g > 0)) for q in queries]
        )
        encoded[name] = _representations(student, [data.queries[q].text for q in queries])
    results = {
        kind: _read_outs(encoded["train"][kind], labels["train"], encoded["val"][kind], labels["val"], len(documents))
        for kind in ("last", "query_mean")
    }
    report = {
        "model": args.model,
        "data": args.data,
        "train_queries": len(labels["train"]),
        "val_queries": len(labels["val"]),
        "classes": len(documents),
        "chance": round(1 / len(documents), 4),
        "results": results,
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
    }
    print("| query representation | 1-NN accuracy | linear probe accuracy |")
    print("|---|---|---|")
    for kind, values in results.items():
        print(f"| {kind} | {values['1nn_accuracy']:.3f} | {values['probe_accuracy']:.3f} |")
    print(f"(chance {report['chance']:.3f}; {report['train_queries']} training, {report['val_queries']} validation queries)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
