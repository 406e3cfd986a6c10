"""Encode a corpus with a trained Rabtriever on Ray Data and build a FAISS index over its first-stage vectors.

    python jobs/index.py --checkpoint runs/demo/checkpoint --data rabtriever_ray/demo_data --out runs/demo_index
    python jobs/index.py --checkpoint CKPT --data DIR --out INDEX --index-type hnsw --actors 1:4
    python jobs/index.py --config configs/index/demo.yaml [key=value ...]

Connects to a running cluster when RAY_ADDRESS is set (as under `ray job submit`), else starts local Ray. OUT gets
embeddings/*.parquet (doc_id, doc_text, doc_hidden, doc_vec; schema in rabtriever_ray/index.py), index.faiss and
manifest.json, written atomically. The backbone and prompt are the checkpoint's; --teacher (a teacher YAML) gives
them for a checkpoint that does not record them. --config is this job's YAML (IndexConfig); each flag sets the
key of the same name; trailing key=value arguments override any key.
"""

from __future__ import annotations

import json

from rabtriever_ray.config import IndexConfig, parse_job_args
from rabtriever_ray.index import build_index
from rabtriever_ray.runtime import run_job


def main(argv: list[str] | None = None) -> dict:
    config = parse_job_args(IndexConfig, argv, __doc__)
    manifest = build_index(config)
    keys = ("count", "index_type", "index_params", "proj_dim", "encode_s", "elapsed_s")
    print(json.dumps({"out": config.out, **{k: manifest[k] for k in keys}}, indent=2))
    return manifest


if __name__ == "__main__":
    run_job(main)
