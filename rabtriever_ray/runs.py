"""What a training run is, so that a rerun with the same name resumes only its own checkpoints.

Beside Ray Train's run folder, ``rabtriever_run.json`` records the run's fingerprint (`run_fingerprint`): its config
less the keys a resumed run may change (`RUN_SHAPE_KEYS`), and a digest of each input's files (their paths, sizes
and modification times: data folders, run files, the teacher's files). `check_resume` refuses a rerun whose
fingerprint differs, naming what differs, unless ``resume=any``. The distillation's persisted teacher outputs live
beside its runs too (`teacher_outputs_dir`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import to_dict

FINGERPRINT_FILE = "rabtriever_run.json"  # in Ray Train's run folder: what the run is (`check_resume`)
# Config keys that shape the cluster, the console, the outputs' place or the validation, not what is trained, and
# ``epochs`` (a finished run resumed with more epochs trains on): a resumed run may change them.
RUN_SHAPE_KEYS = frozenset(
    {
        "name", "out", "out_dir", "storage_path", "overwrite", "resume", "verbose", "epochs", "num_workers", "use_gpu",
        "cpus_per_worker", "gpus_per_worker", "placement_strategy", "max_failures", "num_to_keep", "report_every",
        "teacher_actors", "teacher_cpus", "teacher_gpus", "teacher_batch_size", "teacher_cache_mb",
        "embedding_cache_mb", "max_batch_tokens", "persist_teacher", "cost_queries", "data_dir", "train_data",
        "val_data", "data", "teacher_data", "val_teacher_data", "val_split", "max_val_queries", "val_candidates",
        "validate_before",
    }
)  # fmt: skip  (the data folders' paths: their files are fingerprinted instead, wherever they are)


def _flat(mapping: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def files_digest(paths: Iterable[str | Path]) -> str:
    """SHA-256 over the files at ``paths`` (files, or folders walked in full): each file's path relative to its
    root, size and modification time. Changes when a file is rewritten, added or removed; reading no file."""
    listing = []
    for root in sorted({Path(p).resolve() for p in paths}):
        if root.is_file():
            listing.append((str(root), root.stat().st_size, root.stat().st_mtime_ns))
        for folder, _, names in sorted(os.walk(root)):
            for name in sorted(names):
                path = Path(folder, name)
                stat = path.stat()
                listing.append((f"{root}:{path.relative_to(root)}", stat.st_size, stat.st_mtime_ns))
    return hashlib.sha256(json.dumps(listing).encode()).hexdigest()


def run_fingerprint(cfg, files: dict[str, Iterable[str | Path]]) -> dict[str, Any]:
    """What defines a training run: ``cfg`` flattened to dotted keys less `RUN_SHAPE_KEYS` (at any depth), and
    ``files:<role>`` -> `files_digest` for each role's input files (data folders, run files, the teacher)."""
    config = {
        key: value for key, value in _flat(dataclasses.asdict(cfg)).items()
        if not set(key.split(".")) & RUN_SHAPE_KEYS
    }  # fmt: skip
    return {**config, **{f"files:{role}": files_digest(paths) for role, paths in files.items()}}


def model_files(model: str) -> list[Path]:
    """The files that make a model folder (its top level: weights, config, tokenizer); none for a spec that is not
    a folder (its name is in the config already)."""
    folder = Path(model)
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


def check_resume(run_folder: Path, fingerprint: dict[str, Any], resume: str) -> None:
    """Refuse to resume ``run_folder`` (Ray Train's, holding checkpoints) for a run that is not the one it holds:
    a `ValueError` naming the keys that differ, unless ``resume="any"``. Writes the fingerprint when the folder
    holds no checkpoint yet (or one from before fingerprints), so a later rerun is checked against it."""
    from .io import write_text_atomic

    path = run_folder / FINGERPRINT_FILE
    resumable = run_folder.is_dir() and any(run_folder.glob("checkpoint_*"))
    if resumable and path.is_file() and resume != "any":
        recorded = json.loads(path.read_text())
        differ = sorted(k for k in recorded.keys() | fingerprint.keys() if recorded.get(k) != fingerprint.get(k))
        if differ:
            shown = ", ".join(
                f"{k} ({recorded.get(k)!r} -> {fingerprint.get(k)!r})" if not k.startswith("files:") else k
                for k in differ[:6]
            ) + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
            raise ValueError(
                f"{run_folder}: holds checkpoints of another run with this name; what differs: {shown}. "
                "Give this run another name (name=...), remove that folder, or pass resume=any to resume it anyway"
            )
    if not (resumable and path.is_file()):
        run_folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(fingerprint, indent=1, sort_keys=True, default=str) + "\n")


def distill_fingerprint(cfg, train_root: Path) -> dict[str, Any]:
    """What defines a distillation (`run_fingerprint`; ``cfg`` a `DistillConfig`): its config, the training data
    folder, run files and pre-scored teacher data, and the teacher's files."""
    inputs = {"train": [train_root], "teacher": model_files(cfg.teacher.model)}
    if cfg.teacher_data:
        inputs["teacher_data"] = [cfg.teacher_data]
    for key in ("candidates", "round_pool"):
        if getattr(cfg, f"{key}_spec").kind == "run":
            inputs[key] = [getattr(cfg, f"{key}_spec").path]
    return run_fingerprint(cfg, inputs)


def teacher_outputs_dir(cfg, storage: Path) -> Path | None:
    """Where a distillation's teacher stages persist their scored batches (`pipeline.TeacherScorer`), beside its
    Ray Train runs under ``storage``: one folder per teacher (its config and model files), so another teacher never
    reads these back. None with ``persist_teacher=false``."""
    if not cfg.persist_teacher:
        return None
    identity = json.dumps([to_dict(cfg.teacher), files_digest(model_files(cfg.teacher.model))], default=str)
    return storage / f"{cfg.name}-teacher-outputs" / hashlib.sha256(identity.encode()).hexdigest()[:16]


def persisted_counts(outputs_dir: str | Path) -> dict[str, int]:
    """Pairs the teacher stages (`pipeline.TeacherScorer`) with ``outputs_dir`` scored (``scored``) and read back
    (``read``) so far."""
    counts = {"scored": 0, "read": 0}
    for path in (Path(outputs_dir) / "_counts").glob("*.json"):
        for kind, rows in json.loads(path.read_text()).items():
            counts[kind] += rows
    return counts
