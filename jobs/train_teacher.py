"""Fine-tune the teacher (the generative reranker) with Ray Train; save it as a Hugging Face model directory.

    python jobs/train_teacher.py                                       # the bundled demo data, default model
    python jobs/train_teacher.py --config configs/teacher_train/esconv_strategy.yaml
    python jobs/train_teacher.py --data DIR --split train --out runs/my_teacher --negatives 7 --lora
    ray job submit --working-dir . -- python jobs/train_teacher.py --config ... use_gpu=true num_workers=4

Connects to a running cluster when RAY_ADDRESS is set, else starts local Ray. Each flag sets the config key of the
same name (--model M is --teacher M); trailing key=value arguments set any key (teacher.prompt.max_doc_tokens=256).
Writes OUT (default runs/<name>): the model (safetensors, config, tokenizer, rabtriever_teacher.json with the
prompt), val_scores/ (the validation pairs scored by the trained model) and report.json (validation before and
after). Checkpoints go to Ray Train storage; a rerun with the same name resumes from the latest one. Use the
model as --model / teacher=OUT in every other job, with the same prompt.
"""

from __future__ import annotations

import logging

from rabtriever_ray.config import TeacherTrainConfig, parse_job_args
from rabtriever_ray.finetune import format_report, run_train_teacher
from rabtriever_ray.runtime import run_job


def main(argv: list[str] | None = None) -> dict:
    config = parse_job_args(TeacherTrainConfig, argv, __doc__, aliases={"--model": "teacher"})
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    report = run_train_teacher(config)
    print(format_report(report))
    print(f"\nwrote {config.out or f'runs/{config.name}'} (model, val_scores/, report.json)")
    return report


if __name__ == "__main__":
    run_job(main)
