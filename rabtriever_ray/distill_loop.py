"""Distillation on each Ray Train worker: the embedding cache, the explicit loss step and the worker loop.

The step (`distill_losses`) takes the frozen embeddings of a batch of (query, document) pairs and the teacher's
outputs for them, and returns every loss term::

    predicted      = predictor(h_q, h_d)
    jepa           = jepa_loss(predicted, teacher_hidden)
    rkl            = reverse_kl(lm_head(norm(predicted)), lm_head(norm(teacher_hidden)), T)
    list           = listwise_kl(scale * q_proj(h_q) . d_proj(h_d), teacher_score, T)   per query in the batch
    rank           = listwise_kl(student_score, teacher_score, T)                         per query in the batch
    total          = w_jepa * jepa + w_rkl * rkl + w_list * list + w_rank * rank

Only the hidden state travels from the teacher; its logits are recomputed here with the frozen head.
`train_loop_per_worker` runs the step over the worker's teacher batches (`teacher_batches`).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .config import LossConfig, to_dict
from .losses import check_finite, jepa_loss, listwise_kl, reverse_kl
from .student import Rabtriever
from .teacher_batches import BatchStore, TeacherStream, epoch_batches, teacher_batch_tensors


class EmbeddingCache:
    """Frozen-backbone embeddings keyed by text, so a text is encoded once while it stays cached.

    Args:
        encode: texts -> ``[n, d]`` embeddings (e.g. `Rabtriever.encode_queries`).
        max_bytes: the most bytes of embeddings kept; past it the least recently used are dropped (and encoded
            again if they come back). ``None``: no bound. The rows a call returns are never dropped by that call.

    ``encoded`` counts the texts encoded so far (re-encodings included).
    """

    def __init__(self, encode: Callable[[Sequence[str]], torch.Tensor], max_bytes: int | None = None):
        self._encode = encode
        self._rows: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.max_bytes = max_bytes
        self.bytes = 0
        self.encoded = 0

    def __len__(self) -> int:
        return len(self._rows)

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        """``[len(texts), d]`` embeddings; texts not cached are encoded together in one call."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._rows))
        if missing:
            for text, row in zip(missing, self._encode(missing), strict=True):
                self._rows[text] = row
                self.bytes += row.numel() * row.element_size()
            self.encoded += len(missing)
        out = torch.stack([self._rows[t] for t in texts])
        for text in dict.fromkeys(texts):
            self._rows.move_to_end(text)
        if self.max_bytes is not None:
            needed = len(set(texts))
            while self.bytes > self.max_bytes and len(self._rows) > needed:
                _, row = self._rows.popitem(last=False)
                self.bytes -= row.numel() * row.element_size()
        return out


def group_by_query(query_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of each query's pairs in a batch: ``index`` ``[B, N]`` (long) and ``mask`` ``[B, N]`` (bool).

    ``B`` is the number of distinct queries (in order of first appearance), ``N`` the most pairs any of them has;
    padding entries point at position 0 and are False in the mask.
    """
    groups: dict[str, list[int]] = {}
    for position, qid in enumerate(query_ids):
        groups.setdefault(qid, []).append(position)
    width = max((len(g) for g in groups.values()), default=0)
    index = torch.zeros((len(groups), width), dtype=torch.long)
    mask = torch.zeros((len(groups), width), dtype=torch.bool)
    for row, positions in enumerate(groups.values()):
        index[row, : len(positions)] = torch.tensor(positions)
        mask[row, : len(positions)] = True
    return index, mask


def distill_losses(
    student: Rabtriever,
    model: torch.nn.Module,
    h_query: torch.Tensor,
    h_doc: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_score: torch.Tensor,
    query_ids: Sequence[str],
    loss: LossConfig,
) -> dict[str, torch.Tensor]:
    """Every loss term and their weighted ``total`` for a batch of ``n`` pairs (see the module docstring).

    Args:
        student: the Rabtriever (its frozen head scores the predictions).
        model: what runs the forward: the student itself, or its DDP wrapper so gradients are synchronised.
        h_query, h_doc: ``[n, d]`` frozen embeddings of each pair's query and document.
        teacher_hidden: ``[n, d]`` teacher hidden states; teacher_score: ``[n]`` teacher scores.
        query_ids: ``n`` query ids; the listwise terms compare the candidates of each query within the batch.
    """
    device = student.q_proj.weight.device
    teacher_hidden = teacher_hidden.to(device=device, dtype=torch.float32)
    teacher_score = teacher_score.to(device=device, dtype=torch.float32)
    predicted, first_stage = model(h_query, h_doc)
    zero = predicted.new_zeros(())
    terms: dict[str, torch.Tensor] = {}
    terms["jepa"] = jepa_loss(predicted, teacher_hidden, loss.jepa_kind) if loss.w_jepa else zero
    if loss.w_rkl:
        with torch.no_grad():
            teacher_logits = student.head.logits(teacher_hidden)
        terms["rkl"] = reverse_kl(student.head.logits(predicted), teacher_logits, loss.temperature)
    else:
        terms["rkl"] = zero
    index, mask = group_by_query(query_ids)
    index, mask = index.to(device), mask.to(device)
    teacher_lists = teacher_score[index]
    terms["list"] = (
        listwise_kl(first_stage[index], teacher_lists, loss.temperature, mask) if loss.w_list else zero
    )
    if loss.w_rank:
        terms["rank"] = listwise_kl(
            student.head.score(predicted)[index], teacher_lists, loss.temperature, mask
        )
    else:
        terms["rank"] = zero
    terms["total"] = (
        loss.w_jepa * terms["jepa"]
        + loss.w_rkl * terms["rkl"]
        + loss.w_list * terms["list"]
        + loss.w_rank * terms["rank"]
    )
    return terms


# --------------------------------------------------------------------------------------------------------------
# The Ray Train loop.


def validate(student: Rabtriever, val: dict, query_cache: EmbeddingCache, doc_cache: EmbeddingCache) -> dict:
    """Student vs teacher on the validation pairs: agreement and retrieval metrics against the qrels."""
    from .metrics import HEADLINE_MEASURES, agreement, retrieval_metrics, run_from_rows

    training = student.training
    student.eval()  # no dropout
    with torch.no_grad():
        scores = student.score(query_cache(val["query_text"]), doc_cache(val["doc_text"])).cpu().tolist()
    student.train(training)
    student_run = run_from_rows(val["query_id"], val["doc_id"], scores)
    teacher_run = run_from_rows(val["query_id"], val["doc_id"], val["teacher_score"])
    metrics = {
        f"val/{k}": v for k, v in retrieval_metrics(student_run, val["qrels"], HEADLINE_MEASURES).items()
    }
    agree = agreement(student_run, teacher_run)
    metrics["val/spearman"] = agree["spearman"]
    metrics["val/top1_agreement"] = agree["top1"]
    return metrics


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: distil the teacher's judgements into this worker's Rabtriever replica.

    ``config``: ``distill`` (a `DistillConfig`), ``steps_per_epoch`` (the same on every worker, so every worker
    reports equally often), ``val`` (validation pairs with teacher scores and qrels, evaluated by rank 0), and for
    on-policy rounds ``round``, ``first_epoch``, ``end_epoch`` and ``init_checkpoint`` (the previous round's).
    Resumes from ``ray.train.get_checkpoint()`` (a failed worker, or a rerun with the same name); a run that is
    already complete reports its last checkpoint once more and returns. Each epoch reports ``teacher_rows``: the
    rows all workers read from the teacher stage in that epoch (the first epoch of every start reads the stream to
    its end; later ones replay the stored batches and report 0).
    """
    import time

    import ray
    import ray.train
    import ray.train.torch

    from .raytrain import (
        CheckpointReporter,
        fault_hook,
        gather_all,
        load_training_state,
        peak_memory_metrics,
        prepare_engine,
        warmup_cosine_scheduler,
    )
    from .teacher import GenerativeReranker

    cfg = config["distill"]
    steps_per_epoch = config["steps_per_epoch"]
    round_index = config.get("round", 0)
    first_epoch, end_epoch = config.get("first_epoch", 0), config.get("end_epoch", cfg.epochs)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    # Training runs the backbone in full precision; the teacher stage and the round sampler run it as configured.
    teacher = GenerativeReranker.from_config(dataclasses.replace(cfg.teacher, quantize="none"), device=device)
    student = Rabtriever(teacher, cfg.student)
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = warmup_cosine_scheduler(
        optimizer, cfg.warmup_steps, steps_per_epoch * (end_epoch - first_epoch)
    )
    start_epoch, step, history = first_epoch, 0, []
    checkpoint = ray.train.get_checkpoint() or config.get("init_checkpoint")
    state, optimizer_state = None, None
    if checkpoint:
        with checkpoint.as_directory() as directory:
            student.load_trainable(directory)  # before DeepSpeed copies the weights into its partitions
            state, optimizer_state, history = load_training_state(directory, cfg, rank, world)
            start_epoch, step = max(first_epoch, int(state["epoch"]) + 1), int(state["step"])
    # DDP must be told when a zero loss weight leaves a trainable part out of the graph.
    weights = cfg.loss
    unused = weights.w_list == 0 or weights.w_jepa == weights.w_rkl == weights.w_rank == 0
    engine, optimizer, scheduler = prepare_engine(
        student, optimizer, scheduler, cfg, optimizer_state, rank, world, find_unused_parameters=unused
    )
    # A new round starts a new warm-up and decay; within a round the schedule resumes.
    if state is not None and state.get("round", 0) == round_index:
        scheduler.load_state_dict(state["scheduler"])

    def write_student(directory: Path, saved: dict) -> None:
        student.save_trainable(
            directory,
            teacher=cfg.teacher.model,
            prompt=to_dict(cfg.teacher.prompt),
            max_batch_tokens=cfg.teacher.max_batch_tokens,
            step=saved["step"],
            epoch=saved["epoch"],
            round=saved["round"],
        )

    reporter = CheckpointReporter(cfg, rank, world, optimizer, scheduler, write_student)
    # Where the workers run (rank order), for the report: SPREAD placement puts them on different nodes.
    worker_nodes = gather_all(ray.get_runtime_context().get_node_id(), world)
    cache_bytes = cfg.embedding_cache_mb * 2**20 // 2  # each cache half of the budget
    query_cache = EmbeddingCache(student.encode_queries, cache_bytes)
    doc_cache = EmbeddingCache(student.encode_documents, cache_bytes)
    shard = ray.train.get_dataset_shard("train")
    # This worker's teacher outputs, kept during the first pass so later epochs reuse them; past the memory
    # budget they go to local disk, removed when the loop ends.
    spill = tempfile.TemporaryDirectory(prefix="rabtriever-teacher-batches-")
    stored = BatchStore(cfg.teacher_cache_mb * 2**20, spill.name)
    generator = torch.Generator().manual_seed(cfg.seed + rank + 1000 * round_index)

    if start_epoch >= end_epoch:  # nothing left (a rerun of a finished run): hand back the last checkpoint
        last = history[-1] if history else {"epoch": start_epoch - 1, "step": step}
        reporter.report(last, history, epoch=start_epoch - 1, step=step, round=round_index)
        return
    for epoch in range(start_epoch, end_epoch):
        stream = None if stored else TeacherStream(shard, cfg.batch_size)
        sums: dict[str, float] = {}
        pairs, started = 0, time.perf_counter()
        for table in epoch_batches(stored, stream, steps_per_epoch, generator):
            batch = teacher_batch_tensors(table)
            fault_hook(config, rank, step)
            terms = distill_losses(
                student,
                engine,
                query_cache(batch["query_text"]),
                doc_cache(batch["doc_text"]),
                batch["teacher_hidden"],
                batch["teacher_score"],
                batch["query_id"],
                cfg.loss,
            )
            queries = list(dict.fromkeys(batch["query_id"]))
            check_finite(terms, f"round {round_index}, epoch {epoch}, step {step} (queries {queries[:3]}...)")
            if cfg.strategy == "deepspeed":
                engine.backward(terms["total"])
                engine.step()  # clips, steps the optimizer and the scheduler, zeroes the gradients
            else:
                optimizer.zero_grad(set_to_none=True)
                terms["total"].backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.grad_clip)
                optimizer.step()
                scheduler.step()
            step += 1
            pairs += len(batch["query_id"])
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        metrics = {f"loss/{k}": v / steps_per_epoch for k, v in sums.items()}
        metrics.update(
            round=round_index,
            epoch=epoch,
            step=step,
            lr=scheduler.get_last_lr()[0],
            pairs_per_s=pairs * world / (time.perf_counter() - started),
            encoded_queries=query_cache.encoded,
            encoded_documents=doc_cache.encoded,
            worker_nodes=worker_nodes,
        )
        # Rows the workers read from the teacher stage in this epoch (0 when it replays the stored batches).
        metrics["teacher_rows"] = sum(gather_all(stream.rows if stream is not None else 0, world))
        metrics["spilled_batches"] = sum(gather_all(stored.spilled, world))
        metrics.update(peak_memory_metrics(device, world))
        if rank == 0 and config.get("val"):
            metrics.update(validate(student, config["val"], query_cache, doc_cache))
        if rank == 0:
            history.append(metrics)
        reporter.report(metrics, history, epoch=epoch, step=step, round=round_index)
    spill.cleanup()
