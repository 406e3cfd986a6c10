"""Ray Train plumbing shared by the two training loops (`distill_loop.train_loop_per_worker`, distillation, and
`finetune_loop.train_teacher_loop`, teacher fine-tuning).

Each loop keeps what is its own (the data, the loss step, the metrics) and calls this module for the rest: the
learning-rate schedule (`warmup_cosine_scheduler`), DDP or DeepSpeed around the model with the optimizer state
restored (`prepare_engine`), checkpoints (`CheckpointReporter`, `load_training_state`), the fault-injection test
hook (`fault_hook`), peak memory (`peak_memory_metrics`) and the `TorchTrainer` itself (`fit_torch_trainer`).

A checkpoint directory holds::

    optimizer.pt             the optimizer state (DDP; written by rank 0)
    optimizer_rank{r}.pt     rank r's optimizer partition (DeepSpeed; every rank writes its own)
    training_state.pt        {"scheduler", "epoch", "step", ..., "strategy", "world_size"} (rank 0)
    history.json             the metrics reported so far, one dict per report (rank 0)
    ...                      the trained weights, written by the loop's own ``write_model`` (rank 0)

``cfg`` below is a `DistillConfig` or a `TeacherTrainConfig`: both have ``strategy`` (``ddp`` or ``deepspeed``),
``zero_stage``, ``batch_size`` and ``grad_clip``.

A rerun with the same name resumes only the run it names (`runs.check_resume`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from ray.train import DataConfig

from . import raycompat

HISTORY_FILE = "history.json"
TRAINING_STATE_FILE = "training_state.pt"


# --------------------------------------------------------------------------------------------------------------
# Learning-rate schedule.


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """Learning-rate factor: linear warm-up to 1, then cosine decay to 0 at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler that multiplies the learning rate by `warmup_cosine` of the step (stepped once per step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps)
    )


# --------------------------------------------------------------------------------------------------------------
# DDP or DeepSpeed, and the optimizer state.


def deepspeed_engine(
    model, optimizer, scheduler, micro_batch: int, grad_clip: float, zero_stage: int, grad_accum: int = 1
):
    """``deepspeed.initialize`` around ``model``'s trainable parameters (imported here: only DeepSpeed workers need it).

    Trainable weights stay float32 (DeepSpeed's own bf16/fp16 modes are off; GPU callers use autocast), and our
    AdamW is used, so DDP and DeepSpeed optimise the same way. Returns ``(engine, optimizer, scheduler)``.
    """
    import deepspeed

    # ZeRO's gradient and all-gather buckets default to 5e8 elements (2 GB of fp32 on a GPU); for small trainable
    # parts one bucket the size of all of them is enough (ZeRO wants a multiple of its alignment factor: round up
    # to 4096), and large models keep the default.
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    bucket = min(-(-trainable // 4096) * 4096, int(5e8))
    ds_config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": {
            "stage": zero_stage,
            "reduce_bucket_size": bucket,
            "allgather_bucket_size": bucket,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler


def restore_optimizer(optimizer, state: dict, strategy: str, zero_stage: int, rank: int, world: int) -> None:
    """Load this rank's saved optimizer ``state`` (`load_training_state`) into ``optimizer``.

    A ZeRO optimizer (DeepSpeed, stage 1 or 2) takes the list of every rank's partition and reads its own entry;
    a plain or stage-0 optimizer takes the state itself.
    """
    if strategy == "deepspeed" and zero_stage != 0:
        optimizer.load_state_dict([state if r == rank else None for r in range(world)])
    else:
        optimizer.load_state_dict(state)


def prepare_engine(
    model: torch.nn.Module,
    optimizer,
    scheduler,
    cfg,
    optimizer_state: dict | None,
    rank: int,
    world: int,
    grad_accum: int = 1,
    find_unused_parameters: bool = False,
):
    """``model`` made ready to train under ``cfg.strategy``, with ``optimizer_state`` (when resuming) restored.

    DeepSpeed (`deepspeed_engine`, micro-batch ``cfg.batch_size``, ``grad_accum`` micro-batches per step) or
    DDP (``ray.train.torch.prepare_model``; ``find_unused_parameters`` when a trainable part can be out of the
    graph). Returns ``(engine, optimizer, scheduler)``: run the forward through ``engine``; under DeepSpeed the
    optimizer and scheduler are DeepSpeed's, stepped by ``engine.step()``.
    """
    import ray.train.torch

    if cfg.strategy == "deepspeed":
        engine, optimizer, scheduler = deepspeed_engine(
            model, optimizer, scheduler, cfg.batch_size, cfg.grad_clip, cfg.zero_stage, grad_accum
        )
    # DeepSpeed's optimizer is restored once it exists; a plain one before DDP moves the model to its device.
    if optimizer_state is not None:
        restore_optimizer(optimizer, optimizer_state, cfg.strategy, cfg.zero_stage, rank, world)
    if cfg.strategy == "ddp":
        engine = ray.train.torch.prepare_model(
            model, parallel_strategy_kwargs={"find_unused_parameters": find_unused_parameters}
        )
    return engine, optimizer, scheduler


# --------------------------------------------------------------------------------------------------------------
# Checkpoints.


def optimizer_file(cfg, rank: int) -> str:
    """The name of ``rank``'s optimizer file in a checkpoint directory."""
    # ZeRO partitions the optimizer state: each DeepSpeed rank keeps its own part.
    return f"optimizer_rank{rank}.pt" if cfg.strategy == "deepspeed" else "optimizer.pt"


def read_history(directory: str | Path) -> list[dict]:
    """The metrics a checkpoint directory holds, one dict per report so far."""
    return json.loads((Path(directory) / HISTORY_FILE).read_text())


def load_training_state(directory, cfg, rank: int, world: int) -> tuple[dict, dict, list[dict]]:
    """(training state, this rank's optimizer state, history) from a checkpoint directory (``weights_only``).

    A checkpoint written under another strategy, or a DeepSpeed one from another number of workers, is refused.
    """
    directory = Path(directory)
    state = torch.load(directory / TRAINING_STATE_FILE, weights_only=True)
    if state.get("strategy", "ddp") != cfg.strategy:
        raise ValueError(
            f"{directory}: checkpoint written with strategy={state.get('strategy', 'ddp')!r}, "
            f"but this run has strategy={cfg.strategy!r}"
        )
    if cfg.strategy == "deepspeed" and state["world_size"] != world:
        raise ValueError(
            f"{directory}: DeepSpeed checkpoint from {state['world_size']} workers; resume with "
            f"num_workers={state['world_size']} (ZeRO partitions the optimizer state by rank)"
        )
    safe = []
    if cfg.strategy == "deepspeed":  # the ZeRO optimizer's state holds these three plain DeepSpeed types
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        safe = [LossScaler, ZeroStageEnum, fragment_address]
    with torch.serialization.safe_globals(safe):
        optimizer_state = torch.load(directory / optimizer_file(cfg, rank), weights_only=True)
    return state, optimizer_state, read_history(directory)


class CheckpointReporter:
    """Writes a checkpoint directory (see the module docstring) and reports it with the metrics to Ray Train.

    Args:
        cfg: the run config (its ``strategy``).
        rank, world: this worker's rank and the number of workers.
        optimizer, scheduler: those that train (DeepSpeed's, under DeepSpeed); their state is saved.
        write_model: ``(directory, training_state)`` -> None, writes the trained weights (called on rank 0).
    """

    def __init__(
        self, cfg, rank: int, world: int, optimizer, scheduler, write_model: Callable[[Path, dict], None]
    ):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.optimizer, self.scheduler, self.write_model = optimizer, scheduler, write_model

    def report(self, metrics: dict, history: list[dict], **training_state) -> None:
        """``ray.train.report(metrics)`` with a checkpoint holding ``training_state`` (``epoch``, ``step``, ...).

        Every worker must call it. Under DDP only rank 0 writes (the replicas are identical); under DeepSpeed
        every rank adds its optimizer partition and Ray Train merges the ranks' files into one directory.
        """
        import tempfile

        import ray.train

        keep = self.rank == 0 or self.cfg.strategy == "deepspeed"
        with tempfile.TemporaryDirectory() as name:
            directory = Path(name)
            if keep:
                torch.save(self.optimizer.state_dict(), directory / optimizer_file(self.cfg, self.rank))
            if self.rank == 0:
                state = {
                    "scheduler": self.scheduler.state_dict(),
                    **training_state,
                    "strategy": self.cfg.strategy,
                    "world_size": self.world,
                }
                self.write_model(directory, state)
                torch.save(state, directory / TRAINING_STATE_FILE)
                (directory / HISTORY_FILE).write_text(json.dumps(history))
            checkpoint = ray.train.Checkpoint.from_directory(name) if keep else None
            ray.train.report(metrics, checkpoint=checkpoint)


# --------------------------------------------------------------------------------------------------------------
# Test hook, memory, the trainer.


def fault_hook(config: dict, rank: int, step: int) -> None:
    """Test hook: with ``config["fail_once_after_step"] = (marker path, n)``, rank 0 raises once at step >= n.

    The marker file records that the failure happened, so the restarted workers run on past it.
    """
    fault = config.get("fail_once_after_step")
    if fault and rank == 0 and step >= fault[1] and not Path(fault[0]).exists():
        Path(fault[0]).write_text(str(step))
        raise RuntimeError(f"injected worker failure at step {step}")


def gather_all(value, world: int) -> list:
    """Every worker's ``value``, in rank order (all workers must call it)."""
    if world == 1:
        return [value]
    values = [None] * world
    torch.distributed.all_gather_object(values, value)
    return values


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_memory_metrics(device: torch.device, world: int) -> dict[str, list[float]]:
    """Every worker's peak memory in MiB, in rank order: ``worker_peak_rss_mb`` and, on CUDA,
    ``worker_peak_cuda_mb`` (allocated by torch). All workers must call it."""
    metrics = {"worker_peak_rss_mb": gather_all(peak_rss_mb(), world)}
    if device.type == "cuda":
        metrics["worker_peak_cuda_mb"] = gather_all(torch.cuda.max_memory_allocated(device) / 2**20, world)
    return metrics


class WholeBlockSplit(DataConfig):
    """`ray.train.DataConfig` whose split of the datasets in ``datasets_to_split`` hands each worker whole blocks.

    Ray Train splits with ``streaming_split(equal=True)``, which cuts blocks to give every worker the same number
    of rows; that would cut a candidate list built whole by `pipeline.pairs_dataset`. Here the split is
    ``equal=False``: shards differ by up to a block, and the training loop evens out the step counts
    (`distill_loop.train_loop_per_worker`). Otherwise as `DataConfig.configure` (execution options, locality).
    """

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        split = raycompat.datasets_to_split(self, set(datasets))
        output = super().configure(
            {n: d for n, d in datasets.items() if n not in split},
            world_size,
            worker_handles,
            worker_node_ids,
            **kwargs,
        )
        locality = worker_node_ids if raycompat.shard_locality(self) else None
        for name in sorted(split):
            dataset = datasets[name].copy(datasets[name])
            if dataset.name is None:
                dataset.set_name(name)
            dataset.context.execution_options = raycompat.execution_options(self, name)
            for rank, shard in enumerate(
                dataset.streaming_split(world_size, equal=False, locality_hints=locality)
            ):
                output[rank][name] = shard
        return output


def fit_torch_trainer(
    loop: Callable[[dict], None],
    loop_config: dict,
    cfg,
    name: str,
    storage: Path,
    bar=None,
    fingerprint: dict[str, Any] | None = None,
    **kwargs,
):
    """Run ``loop`` on a `TorchTrainer` shaped by ``cfg`` and return the final checkpoint.

    ``cfg`` is a `DistillConfig` or `TeacherTrainConfig`: workers, CPUs and GPUs per worker, placement,
    ``max_failures`` (workers restart from the last checkpoint) and ``num_to_keep``. A rerun with the same ``name``
    under ``storage`` resumes from its latest checkpoint, when its ``fingerprint`` (`runs.run_fingerprint`) is the
    recorded one (`check_resume`, as ``cfg.resume`` says). ``bar`` (a `console.stage` bar) follows the ``step``
    the workers report. ``kwargs`` go to `TorchTrainer` (datasets, ...).
    """
    if fingerprint is not None:
        from .runs import check_resume

        check_resume(Path(storage) / name, fingerprint, cfg.resume)
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from .console import step_progress

    callback, stop = step_progress(bar) if bar is not None else (None, None)
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker}
            | ({"GPU": cfg.gpus_per_worker} if cfg.use_gpu else {}),
            placement_strategy=getattr(cfg, "placement_strategy", "PACK"),
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.num_to_keep),
            callbacks=[callback] if callback else None,
        ),
        **kwargs,
    )
    try:
        result = trainer.fit()
    finally:
        if stop:
            stop()
    if result.checkpoint is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint: {result.error}")
    return result.checkpoint
