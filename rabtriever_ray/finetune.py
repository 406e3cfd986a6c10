"""The teacher fine-tuning recipe (``jobs/train_teacher.py``): train the generative reranker itself with Ray Train.

`run_train_teacher(config)`:

1. builds training groups from a BEIR folder (`finetune_loop.build_groups`) and the validation pairs
   (`data.read_pairs`: a run file read and joined in Ray, other specs built here);
2. scores the validation pairs with the model as it is ("before", `pipeline.score_pairs`);
3. trains under ``TorchTrainer`` (`finetune_loop.train_teacher_loop`), with ``FailureConfig`` and resume of a
   rerun with the same name;
4. writes ``out/``: a Hugging Face model directory (safetensors, config, tokenizer; LoRA merged in) with
   ``rabtriever_teacher.json`` (the prompt it was trained with, the base model, the data), which
   `models.load_causal_lm` and every job accept as ``--model`` / ``teacher=``;
5. scores the same validation pairs with the saved model ("after") into ``out/val_scores/`` (the
   ``jobs/score_teacher.py`` format, `teacher_scores.write_scored_pairs`, so ``jobs/distill.py
   val_teacher_data=out/val_scores`` reuses them) and writes ``out/report.json``: config, counts, R@1 / RR@10 /
   nDCG@10 before and after, history, timings.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from . import console
from .config import DistillConfig, ScoreTeacherConfig, TeacherTrainConfig, to_dict
from .data import data_root, read_beir, read_pairs
from .finetune_loop import TRAINABLE_FILE, build_groups, build_trained_model, save_teacher, train_teacher_loop
from .metrics import HEADLINE_MEASURES, metrics_table
from .models import resolve_spec

logger = logging.getLogger(__name__)


def _score_metrics(table, qrels: dict) -> dict[str, float]:
    """Metrics of scored pairs over exactly the queries they hold (not every query the split judges)."""
    from .metrics import retrieval_metrics, run_from_rows

    run = run_from_rows(
        table.column("query_id").to_pylist(),
        table.column("doc_id").to_pylist(),
        table.column("teacher_score").to_pylist(),
    )
    return retrieval_metrics(run, {q: qrels[q] for q in run if q in qrels}, HEADLINE_MEASURES)


def run_train_teacher(
    cfg: TeacherTrainConfig,
    fail_once_after_step: tuple[str, int] | None = None,
    validation: tuple[Any, Any] | None = None,
) -> dict:
    """Run one teacher fine-tuning (see the module docstring); returns the report also written to ``out``.

    ``validation``: the validation data and pairs when the caller has them (`data.read_pairs` of the config's
    validation keys), so that it and this run score the same pairs.
    """
    from .io import atomic_dir, write_json_atomic
    from .pipeline import score_pairs
    from .raytrain import fit_torch_trainer, read_history
    from .runs import model_files, run_fingerprint
    from .runtime import init_ray
    from .teacher_scores import write_scored_pairs

    started = time.perf_counter()
    teacher = dataclasses.replace(cfg.teacher, model=resolve_spec(cfg.teacher.model))
    cfg = dataclasses.replace(cfg, teacher=teacher)  # workers run elsewhere
    out = Path(cfg.out or f"runs/{cfg.name}").resolve()
    storage = Path(cfg.storage_path).resolve() if cfg.storage_path else out.parent / f"{out.name}-ray"
    # Refuses before any expensive work; the model is committed at the block's end, before the validation below.
    with atomic_dir(out, cfg.overwrite) as staging:
        train_data = read_beir(data_root(cfg.data), cfg.split)
        groups, skipped = build_groups(
            train_data, cfg.negatives, cfg.negatives_from, cfg.max_queries, cfg.seed
        )
        steps_per_epoch = len(groups) // (cfg.num_workers * cfg.batch_size * cfg.grad_accum)
        if steps_per_epoch < 1:
            raise ValueError(
                f"{len(groups)} training groups are fewer than one step needs (num_workers x batch_size x "
                f"grad_accum = {cfg.num_workers * cfg.batch_size * cfg.grad_accum}); use more queries or smaller batches"
            )
        validate = cfg.val_data is not None
        if validate:
            val_root = data_root(cfg.val_data or cfg.data)
            val_data, val_pairs = validation or read_pairs(
                val_root, cfg.val_split, cfg.val_candidates, cfg.max_val_queries, cfg.seed
            )
        init_ray()
        gpus = cfg.teacher_gpus if cfg.use_gpu else 0.0
        scoring = {
            "actors": (1, cfg.teacher_actors),
            "cpus_per_actor": cfg.teacher_cpus,
            "gpus_per_actor": gpus,
        }
        report: dict[str, Any] = {"config": to_dict(cfg)}
        timings: dict[str, float] = {}
        if validate and cfg.validate_before:
            t0 = time.perf_counter()
            before = score_pairs(
                val_pairs, cfg.teacher, **scoring, title="teacher before fine-tuning: validation pairs"
            )
            report["before"] = _score_metrics(before, val_data.qrels)
            timings["validate_before"] = round(time.perf_counter() - t0, 1)
            logger.info("before: %s", report["before"])

        t0 = time.perf_counter()
        with console.stage("fine-tuning the teacher", steps_per_epoch * cfg.epochs, "steps") as bar:
            checkpoint = fit_torch_trainer(
                train_teacher_loop,
                {
                    "train": cfg,
                    "groups": groups,
                    "steps_per_epoch": steps_per_epoch,
                    "fail_once_after_step": fail_once_after_step,
                },
                cfg,
                cfg.name,
                storage,
                bar=bar,
                fingerprint=run_fingerprint(
                    cfg, {"data": [data_root(cfg.data)], "teacher": model_files(cfg.teacher.model)}
                ),
            )
        timings["train"] = round(time.perf_counter() - t0, 1)
        with checkpoint.as_directory() as directory:
            history = read_history(directory)
            model, tokenizer = build_trained_model(cfg, Path(directory) / TRAINABLE_FILE)
        info = {
            "format": "rabtriever-teacher/1",
            "base_model": cfg.teacher.model,
            "prompt": to_dict(cfg.teacher.prompt),
            "lora": cfg.lora,
            "data": str(data_root(cfg.data)),
            "split": cfg.split,
            "train_queries": len(groups),
            "steps": history[-1]["step"] if history else 0,
        }
        save_teacher(model, tokenizer, staging, info)

    report["counts"] = {
        "train_queries": len(groups),
        "skipped_queries": skipped,
        "pairs_per_group": 1 + cfg.negatives,
        "steps_per_epoch": steps_per_epoch,
        "steps": history[-1]["step"] if history else 0,
    }
    if validate:
        t0 = time.perf_counter()
        tuned = dataclasses.replace(cfg.teacher, model=str(out))
        after = score_pairs(val_pairs, tuned, **scoring, title="fine-tuned teacher: validation pairs")
        write_scored_pairs(
            after,
            ScoreTeacherConfig(
                data=str(val_root),
                split=cfg.val_split,
                out=str(out / "val_scores"),
                teacher=tuned,
                candidates=cfg.val_candidates,
                max_queries=cfg.max_val_queries,
                seed=cfg.seed,
                overwrite=True,
            ),
            time.perf_counter() - t0,
        )
        report["after"] = _score_metrics(after, val_data.qrels)
        report["counts"].update(
            val_queries=len(set(val_pairs.column("query_id").to_pylist())), val_pairs=len(val_pairs)
        )
        timings["validate_after"] = round(time.perf_counter() - t0, 1)
    timings["total"] = round(time.perf_counter() - started, 1)
    report.update(history=history, timings_s=timings)
    write_json_atomic(out / "report.json", report)
    return report


def finetune_before_distillation(
    cfg: DistillConfig, train_root: Path, val_data, val_pairs, storage: Path, free_cpus: float
) -> dict:
    """Fine-tune ``cfg.teacher`` with the recipe ``cfg.finetune`` on the distillation's own training split (at most
    its ``max_train_queries`` sample: never on queries the distillation treats as unlabelled), and
    score the distillation's validation pairs (``val_pairs`` of ``val_data``) with it before and after
    (`run_train_teacher`).

    The teacher is written to ``<out_dir>/teacher`` (a model directory with ``val_scores/``, the distillation's
    validation scores, and ``report.json``); a finished one there is reused, so a rerun resumes. Training and
    validation run alone, so each may use the ``free_cpus`` of a node (at least the recipe's own). Returns the
    fine-tuning report.
    """
    import json

    out = Path(cfg.out_dir or f"runs/{cfg.name}").resolve() / "teacher"
    if (out / "report.json").is_file():
        logger.info("reusing the fine-tuned teacher in %s", out)
        return json.loads((out / "report.json").read_text())
    recipe = cfg.finetune
    tune = dataclasses.replace(
        recipe,
        name=f"{cfg.name}-teacher",
        out=str(out),
        storage_path=str(storage),
        overwrite=True,
        data=str(train_root),
        split=cfg.train_split,
        teacher=cfg.teacher,
        val_data=str(val_data.root),
        val_split=cfg.val_split,
        max_val_queries=cfg.max_val_queries,
        val_candidates=cfg.val_candidates,
        validate_before=True,
        seed=cfg.seed,
        # Labels only of the distillation's labelled sample (the same seeded sample, or a part of it).
        max_queries=min(
            (n for n in (recipe.max_queries, cfg.max_train_queries) if n is not None), default=None
        ),
        use_gpu=cfg.use_gpu,
        cpus_per_worker=max(recipe.cpus_per_worker, free_cpus / recipe.num_workers),
        teacher_cpus=max(recipe.teacher_cpus, free_cpus / recipe.teacher_actors),
    )
    return run_train_teacher(tune, validation=(val_data, val_pairs))


def format_report(report: dict) -> str:
    """The before/after validation table as markdown."""
    if "after" not in report:
        return "(no validation data)"
    rows = {when: report[when] for when in ("before", "after") if when in report}
    return metrics_table(rows, first_header="teacher", measures=HEADLINE_MEASURES)
