"""The demo checkpoint and index that ``serve run rabtriever_ray.serve:app`` serves without ``checkpoint=``.

They live under ``cache_dir()/serve-demo`` (one folder per set of distillation overrides). `ensure_demo` builds
them the first time (the demo distillation, `run_distill` on the bundled data with its teacher fine-tuning, then
`build_index`; about 12 minutes on 2 CPUs) under a file lock, so one process builds and the others wait; later calls reuse them. The training
stack is imported only there: serving imports this module without it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from .models import cache_dir

# Built inside a Serve replica: its "ray.serve" logger goes to the replica's log and the driver's console.
logger = logging.getLogger("ray.serve")

# The demo distillation and index build run beside the deployments' reservations (0.6 CPUs by default), so on a
# 2-CPU machine they get fractions too (Ray Data's own 1-CPU tasks need the rest); the work uses the free cores.
DEMO_RESOURCES = [
    "cpus_per_worker=0.4",
    "teacher_cpus=0.4",
    "finetune.cpus_per_worker=0.4",
    "finetune.teacher_cpus=0.4",
]
DEMO_INDEX_CPUS = 0.4


def demo_paths(demo_distill: list[str]) -> tuple[Path, Path]:
    """(checkpoint, index) of the demo under `cache_dir` (one folder per set of distillation overrides)."""
    name = "serve-demo"
    if demo_distill:
        name += "-" + hashlib.sha256("\n".join(demo_distill).encode()).hexdigest()[:8]
    root = cache_dir() / name
    return root / "distill" / "checkpoint", root / "index"


def ensure_demo(demo_distill: list[str]) -> tuple[Path, Path]:
    """Build the demo checkpoint and index unless they exist (one process at a time); returns their paths."""
    import fcntl

    from .config import DistillConfig, IndexConfig, load_config
    from .data import DEMO_DATA
    from .index import build_index
    from .io import MANIFEST

    checkpoint, index = demo_paths(demo_distill)
    root = index.parent
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not (checkpoint / "student.safetensors").is_file():
            from .distill import run_distill

            logger.warning("building the demo checkpoint in %s (the demo distillation)", checkpoint.parent)
            # The served demo needs no comparison with the bi-encoders (baselines=).
            overrides = [*DEMO_RESOURCES, "baselines=", *demo_distill, f"out_dir={checkpoint.parent}"]
            run_distill(load_config(DistillConfig, None, overrides))
        if not (index / MANIFEST).is_file():
            logger.warning("building the demo index in %s", index)
            build_index(
                IndexConfig(
                    checkpoint=str(checkpoint),
                    data=str(DEMO_DATA),
                    out=str(index),
                    cpus_per_actor=DEMO_INDEX_CPUS,
                    overwrite=True,
                )
            )
    return checkpoint, index
