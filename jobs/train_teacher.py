"""Fine-tune the teacher (the generative reranker) with Ray Train; save it as a Hugging Face model directory.

    python jobs/train_teacher.py                                       # the bundled demo data, default model
    python jobs/train_teacher.py --config configs/teacher_train/esconv_strategy.yaml
    python jobs/train_teacher.py --data DIR --split train --out runs/my_teacher --negatives 7 --lora
    ray job submit --working-dir . -- python jobs/train_teacher.py --config ... use_gpu=true num_workers=4

Connects to a running cluster when RAY_ADDRESS is set, else starts local Ray. The flags below set the config keys
of the same name; trailing key=value arguments set any key (dotted for the prompt: prompt.max_doc_tokens=256).
Writes OUT (default runs/<name>): the model (safetensors, config, tokenizer, rabtriever_teacher.json with the
prompt), val_scores/ (the validation pairs scored by the trained model) and report.json (validation before and
after). Checkpoints go to Ray Train storage; a rerun with the same name resumes from the latest one. Use the
model as --model / teacher=OUT in every other job, with the same prompt.
"""

from __future__ import annotations

import argparse
import logging

from rabtriever_ray.config import TeacherTrainConfig, config_help, load_config
from rabtriever_ray.io import run_job
from rabtriever_ray.train_teacher import format_report, run_train_teacher

# flag -> (config key, argparse options)
FLAGS = {
    "--data": ("data", {}),
    "--split": ("split", {}),
    "--out": ("out", {}),
    "--model": ("model", {}),
    "--max-queries": ("max_queries", {}),
    "--negatives": ("negatives", {}),
    "--negatives-from": ("negatives_from", {}),
    "--epochs": ("epochs", {}),
    "--lr": ("lr", {}),
    "--num-workers": ("num_workers", {}),
    "--use-gpu": ("use_gpu", {"action": "store_const", "const": "true"}),
    "--strategy": ("strategy", {}),
    "--lora": ("lora", {"action": "store_const", "const": "true"}),
    "--val-data": ("val_data", {}),
    "--val-split": ("val_split", {}),
    "--max-val-queries": ("max_val_queries", {}),
    "--overwrite": ("overwrite", {"action": "store_const", "const": "true"}),
}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys:\n" + config_help(TeacherTrainConfig),
    )
    parser.add_argument("--config", default=None, help="teacher training config YAML")
    for flag, (key, options) in FLAGS.items():
        parser.add_argument(flag, dest=key, default=None, help=f"sets {key}", **options)
    parser.add_argument("overrides", nargs="*", help="config overrides, key=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    flags = [f"{key}={getattr(args, key)}" for key, _ in FLAGS.values() if getattr(args, key) is not None]
    config = load_config(TeacherTrainConfig, args.config, flags + list(args.overrides))
    report = run_train_teacher(config)
    print(format_report(report))
    print(f"\nwrote {config.out or f'runs/{config.name}'} (model, val_scores/, report.json)")
    return report


if __name__ == "__main__":
    run_job(main)
