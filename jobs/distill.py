"""Distil the teacher (generative reranker) into Rabtriever with Ray Data + Ray Train.

    python jobs/distill.py                                   # the embedded demo: local Ray, default model, demo data
    python jobs/distill.py --config configs/esconv_strategy.yaml num_workers=2
    ray job submit --working-dir . -- python jobs/distill.py --config configs/esconv_strategy.yaml

Connects to a running cluster when RAY_ADDRESS is set (as under `ray job submit`), else starts local Ray.
Each flag sets the config key of the same name (--teacher runs/my_teacher); trailing key=value arguments
override any key (dotted keys for sections: loss.w_rank=0.5, teacher.prompt.max_doc_tokens=256). A base-model
teacher is first fine-tuned on the training split (finetune_teacher=false skips it). Writes report.json,
checkpoint/, teacher/ and training_curves.png into out_dir (default runs/<name>), and Ray's own log lines into
out_dir/job.log (--verbose shows them instead); a rerun with the same name resumes from the latest checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from rabtriever_ray.config import DistillConfig, parse_job_args
from rabtriever_ray.console import quiet_ray
from rabtriever_ray.distill import run_distill
from rabtriever_ray.report import LOG_FILE, format_summary
from rabtriever_ray.runtime import run_job


def main(argv: list[str] | None = None) -> dict:
    config = parse_job_args(DistillConfig, argv, __doc__)
    out_dir = Path(config.out_dir or f"runs/{config.name}")
    quiet_ray(out_dir / LOG_FILE, verbose=config.verbose)
    report = run_distill(config)
    print("\n" + format_summary(report, out_dir))
    return report


if __name__ == "__main__":
    run_job(main)
