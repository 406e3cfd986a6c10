"""Encode a corpus with a trained Rabtriever on Ray Data and build a FAISS index over its first-stage vectors.

    python jobs/index.py --checkpoint runs/demo/checkpoint --data rabtriever_ray/demo_data --out runs/demo_index
    python jobs/index.py --checkpoint CKPT --data DIR --out INDEX --index-type hnsw --actors 1:4

Connects to a running cluster when RAY_ADDRESS is set (as under `ray job submit`), else starts local Ray. OUT gets
embeddings/*.parquet (doc_id, doc_text, doc_hidden, doc_vec; schema in rabtriever_ray/index.py), index.faiss and
manifest.json, written atomically. The backbone and prompt are the checkpoint's; --config gives them for a
checkpoint that does not record them.
"""

from __future__ import annotations

import argparse
import json

from rabtriever_ray.config import TeacherConfig, actor_range, load_config
from rabtriever_ray.index import build_index
from rabtriever_ray.io import run_job


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="distillation checkpoint folder (student.safetensors)"
    )
    parser.add_argument("--data", required=True, help="BEIR folder; its corpus is indexed")
    parser.add_argument("--out", required=True, help="index folder (written atomically)")
    parser.add_argument("--index-type", choices=["flat", "hnsw", "ivf"], default="flat")
    parser.add_argument("--hnsw-m", type=int, default=32, help="HNSW neighbours per node")
    parser.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4 sqrt(n))")
    parser.add_argument("--config", default=None, help="teacher config YAML, for checkpoints without one")
    parser.add_argument("--actors", type=actor_range, default=(1, 1), help="encoder actor pool MIN:MAX")
    parser.add_argument(
        "--gpus-per-actor", type=float, default=None, help="default: 1 when the cluster has GPUs"
    )
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=256, help="documents per actor call")
    parser.add_argument("--on-bad-row", choices=["fail", "skip"], default="fail")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished OUT")
    args = parser.parse_args(argv)
    teacher = load_config(TeacherConfig, args.config) if args.config else None
    manifest = build_index(
        args.checkpoint,
        args.data,
        args.out,
        index_type=args.index_type,
        teacher=teacher,
        actors=args.actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        batch_size=args.batch_size,
        hnsw_m=args.hnsw_m,
        nlist=args.nlist,
        on_bad_row=args.on_bad_row,
        overwrite=args.overwrite,
    )
    keys = ("count", "index_type", "index_params", "proj_dim", "encode_s", "elapsed_s")
    print(json.dumps({"out": args.out, **{k: manifest[k] for k in keys}}, indent=2))
    return manifest


if __name__ == "__main__":
    run_job(main)
