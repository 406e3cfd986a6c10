"""Cold (GGUF conversion) vs cached load time of the default model, and the trainable-part sizes.

    python benchmarks/model_load.py --out benchmarks/results/model_load.json

The cold load runs in a fresh, temporary $RABTRIEVER_CACHE so the user's cache is untouched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

_CHILD = """
import json, time
t0 = time.perf_counter()
from rabtriever_ray.models import load_causal_lm
t1 = time.perf_counter()
model, tokenizer = load_causal_lm("smollm2-135m", device="cpu")
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""


def _timed_load(cache: str) -> dict:
    env = dict(os.environ, RABTRIEVER_CACHE=cache)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="benchmarks/results/model_load.json")
    args = parser.parse_args()

    from rabtriever_ray.config import StudentConfig
    from rabtriever_ray.predictor import Predictor, count_parameters

    with tempfile.TemporaryDirectory() as cache:
        cold = _timed_load(cache)
        cached = _timed_load(cache)
    hidden_size = 576  # SmolLM2-135M
    config = StudentConfig()
    predictor = count_parameters(
        Predictor(hidden_size, config.predictor_hidden, config.input_norm, config.query_mean)
    )
    query_width = hidden_size * (2 if config.query_mean else 1)
    projections = (query_width + hidden_size) * config.proj_dim
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, python {platform.python_version()}",
        "cold_load_s": round(cold["load_s"], 2),
        "cached_load_s": round(cached["load_s"], 2),
        "cold_over_cached": round(cold["load_s"] / cached["load_s"], 1),
        "import_s": round(cached["import_s"], 2),
        "predictor_params": predictor,
        "projection_params": projections,
        "student_config": {
            "predictor_hidden": config.predictor_hidden,
            "input_norm": config.input_norm,
            "proj_dim": config.proj_dim,
        },
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
