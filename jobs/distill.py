"""Distil the teacher (generative reranker) into Rabtriever with Ray Data + Ray Train.

    python jobs/distill.py                                   # the embedded demo: local Ray, default model, demo data
    python jobs/distill.py --config configs/esconv_strategy.yaml num_workers=2
    ray job submit --working-dir . -- python jobs/distill.py --config configs/esconv_strategy.yaml

Connects to a running cluster when RAY_ADDRESS is set (as under `ray job submit`), else starts local Ray.
Each flag sets the config key of the same name (--teacher runs/my_teacher); trailing key=value arguments
override any key (dotted keys for sections: loss.w_rank=0.5, teacher.prompt.max_doc_tokens=256). Writes
report.json, checkpoint/ and training_curves.png into out_dir (default runs/<name>); a rerun with the same name
resumes from the latest checkpoint.
"""

from __future__ import annotations

from rabtriever_ray.config import DistillConfig, parse_job_args
from rabtriever_ray.distill import format_table, run_distill
from rabtriever_ray.io import run_job


def main(argv: list[str] | None = None) -> dict:
    config = parse_job_args(DistillConfig, argv, __doc__)
    report = run_distill(config)
    print(format_table(report["final"]))
    out_dir = config.out_dir or f"runs/{config.name}"
    print(f"\nwrote {out_dir}/report.json, {out_dir}/checkpoint/, {out_dir}/training_curves.png")
    return report


if __name__ == "__main__":
    run_job(main)
