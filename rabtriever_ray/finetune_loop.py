"""Teacher fine-tuning, the training side: groups, the trainable scorer, its losses, LoRA and the Ray Train loop.

An instruct model used zero-shot is a weak judge of rationale-based relevance; Rabtriever is only as good as its
teacher. The job that runs all of this (data, validation before and after, the saved model) is `finetune`.

- `build_groups`: each query with one positive and ``negatives`` sampled negatives (from every other document,
  or from the top of BM25), seeded;
- `train_teacher_loop`: the ``TorchTrainer`` worker: DDP (gloo on CPU, NCCL on GPU) or DeepSpeed ZeRO, gradient
  accumulation, bf16 autocast on GPU, checkpoints every ``report_every`` steps and resume (`raytrain`). All weights
  train, or LoRA adapters (peft) with ``lora=true``;
- `build_trained_model` / `save_teacher`: the trained weights merged into a plain Hugging Face model directory.

The training step (`teacher_losses`) scores each group's pairs with the exact scoring function of
`GenerativeReranker` (`scoring.YesNoHead` on the pre-norm hidden state at the answer position,
``logp_yes - logp_no``) and mixes::

    total = w_listwise * listwise_ce(scores[group] / T, positive = column 0)
          + w_pointwise * answer_ce(logp_yes, logp_no, label)           # "yes" for the positive, "no" otherwise
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .backbone import last_positions, pad_batch, pre_norm_hidden_at
from .config import TeacherTrainConfig
from .data import BeirData, BM25Index, sample_query_ids
from .families import decoder_layers
from .frozen_states import FrozenStates
from .losses import answer_ce, listwise_ce
from .models import TEACHER_INFO, load_causal_lm
from .prompts import PromptBuilder, document_text
from .scoring import YesNoHead
from .specs import NEGATIVE_POOLS, parse_spec

TRAINABLE_FILE = "trainable.safetensors"


# --------------------------------------------------------------------------------------------------------------
# Training groups.


@dataclass
class TrainingGroup:
    """One query with its positive first, then its negatives."""

    query_id: str
    query_text: str
    doc_ids: list[str]
    doc_texts: list[str]


def build_groups(
    data: BeirData,
    negatives: int,
    negatives_from: str = "all",
    max_queries: int | None = None,
    seed: int = 0,
) -> tuple[list[TrainingGroup], int]:
    """Seeded training groups and the number of selected queries skipped (no positive, or no negative).

    Each group holds one positive (drawn among the query's positives) and up to ``negatives`` documents drawn
    without replacement from the pool: every unjudged-or-zero document (``all``) or the BM25 top K (``bm25:K``),
    positives excluded.
    """
    pool_spec = parse_spec(negatives_from, "negatives_from", NEGATIVE_POOLS)
    rng = random.Random(seed)
    query_ids = sample_query_ids(list(data.queries), max_queries, seed)
    doc_ids = list(data.corpus)
    if pool_spec.kind == "bm25":
        hits, _ = BM25Index.from_corpus(data).search([data.queries[q].text for q in query_ids], pool_spec.k)
        pools = dict(zip(query_ids, hits))
    texts = {d: document_text(doc.title, doc.text) for d, doc in data.corpus.items()}
    groups, skipped = [], 0
    for qid in query_ids:
        positives = sorted(d for d, grade in data.qrels.get(qid, {}).items() if grade > 0)
        pool = [d for d in (pools[qid] if pool_spec.kind == "bm25" else doc_ids) if d not in set(positives)]
        if not positives or not pool:
            skipped += 1
            continue
        chosen = [rng.choice(positives), *rng.sample(pool, min(negatives, len(pool)))]
        groups.append(TrainingGroup(qid, data.queries[qid].text, chosen, [texts[d] for d in chosen]))
    return groups, skipped


# --------------------------------------------------------------------------------------------------------------
# The differentiable scorer and the training step.


class AnswerScorer(nn.Module):
    """The teacher's scoring as a trainable module: pair prompts -> ``(score, logp_yes, logp_no)``, each ``[n]``.

    ``score`` (the preset's rule, ``logp_yes - logp_no`` by default) read by `YesNoHead` from the pre-norm hidden
    state at each prompt's last token, exactly as `GenerativeReranker.score` reads it, but with gradients.
    """

    def __init__(self, model: nn.Module, prompts: PromptBuilder):
        super().__init__()
        self.model = model
        self.head = YesNoHead(model, prompts.yes_id, prompts.no_id, prompts.score_rule)

    def forward(self, input_ids, attention_mask, position_ids, last):
        hidden = pre_norm_hidden_at(self.model, input_ids, attention_mask, position_ids, last)
        return self.head.log_probs(hidden)


def group_batch(prompts: PromptBuilder, groups: list[TrainingGroup], device: torch.device) -> dict:
    """Token tensors for every pair of ``groups`` (group-major) plus ``sizes`` (pairs per group)."""
    queries = [g.query_text for g in groups for _ in g.doc_texts]
    documents = [text for g in groups for text in g.doc_texts]
    encoded = prompts.pair_prompts(queries, documents)
    tokenizer = prompts.tokenizer
    input_ids, attention_mask, position_ids = pad_batch(
        encoded.input_ids, tokenizer.pad_token_id, tokenizer.padding_side, device
    )
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "last": last_positions(attention_mask, tokenizer.padding_side),
        "sizes": [len(g.doc_texts) for g in groups],
    }


def teacher_losses(scorer: nn.Module, batch: dict, cfg: TeacherTrainConfig) -> dict[str, torch.Tensor]:
    """The training step's forward: score every pair, then the listwise and pointwise losses (see module doc)."""
    score, logp_yes, logp_no = scorer(
        batch["input_ids"], batch["attention_mask"], batch["position_ids"], batch["last"]
    )
    sizes = batch["sizes"]
    width = max(sizes)
    index = torch.tensor([g * width + i for g, n in enumerate(sizes) for i in range(n)], device=score.device)
    scores = score.new_zeros(len(sizes) * width).index_copy(0, index, score).view(len(sizes), width)
    mask = torch.zeros(len(sizes) * width, dtype=torch.bool, device=score.device)
    mask[index] = True
    labels = torch.tensor([float(i == 0) for n in sizes for i in range(n)], device=score.device)
    listwise = listwise_ce(scores, cfg.temperature, mask.view(len(sizes), width))
    pointwise = answer_ce(logp_yes, logp_no, labels)
    return {
        "listwise": listwise,
        "pointwise": pointwise,
        "total": cfg.w_listwise * listwise + cfg.w_pointwise * pointwise,
    }


# --------------------------------------------------------------------------------------------------------------
# Models: LoRA, trainable weights, the saved teacher.


def first_trained_block(model: nn.Module, cfg: TeacherTrainConfig) -> int:
    """Index of the lowest decoder block that trains (0: every block, when ``train_layers`` is 0 or too many)."""
    return max(len(decoder_layers(model)) - cfg.train_layers, 0) if cfg.train_layers else 0


def trained_layers(model: nn.Module, cfg: TeacherTrainConfig) -> list[tuple[str, nn.Module]]:
    """``(qualified name, block)`` of the decoder blocks that train: the top ``cfg.train_layers`` (0: all)."""
    blocks = decoder_layers(model)
    first = first_trained_block(model, cfg)
    names = {id(module): name for name, module in model.named_modules()}
    return [(names[id(block)], block) for block in list(blocks)[first:]]


def add_lora(model: nn.Module, cfg: TeacherTrainConfig) -> nn.Module:
    """Inject LoRA adapters (peft) into ``model`` in place; only the adapters stay trainable. Returns ``model``.

    With ``train_layers``, adapters go only into the top blocks, so the forward below them records no graph.
    """
    from peft import LoraConfig, inject_adapter_in_model
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

    wanted = None if cfg.lora_targets == "all-linear" else cfg.lora_targets.split(",")
    if cfg.train_layers:
        # Qualified names of the matching linear layers inside the trained blocks (peft matches name suffixes).
        targets = [
            f"{block_name}.{name}"
            for block_name, block in trained_layers(model, cfg)
            for name, module in block.named_modules()
            if isinstance(module, (nn.Linear, Conv1D))
            and (wanted is None or name.rpartition(".")[2] in wanted)
        ]
        if not targets:
            raise ValueError(
                f"lora_targets={cfg.lora_targets!r} matches no linear layer of the trained blocks"
            )
    else:
        targets = "all-linear" if wanted is None else wanted
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
    )
    torch.manual_seed(cfg.seed)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return inject_adapter_in_model(lora, model)


def make_trainable(model: nn.Module, cfg: TeacherTrainConfig) -> None:
    """Mark what trains: LoRA adapters injected into ``model`` (``cfg.lora``), or every weight; with
    ``train_layers``, only in (or of) the top decoder blocks."""
    if cfg.lora:
        add_lora(model, cfg)
        return
    for parameter in model.parameters():
        parameter.requires_grad_(not cfg.train_layers)
    if cfg.train_layers:
        for _, block in trained_layers(model, cfg):
            block.requires_grad_(True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter into its base weight and replace the LoRA layers by plain ones (in place)."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], module.get_base_layer())
    return model


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (all of them, or the LoRA adapters), detached on CPU, by name."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_into(model: nn.Module, path: str | Path) -> None:
    """Load `trainable_state` saved as safetensors into ``model``; every trainable parameter must be there."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ValueError(
            f"{path}: trainable weights do not match the model (missing {missing[:3]}, extra {extra[:3]})"
        )
    model.load_state_dict(state, strict=False)


def build_trained_model(cfg: TeacherTrainConfig, trainable_path: str | Path):
    """``(model, tokenizer)``: the base model with the trained weights on CPU, LoRA merged (a plain HF model)."""
    model, tokenizer = load_causal_lm(cfg.teacher.model, device="cpu", dtype=torch.float32)
    make_trainable(model, cfg)
    load_trainable_into(model, trainable_path)
    if cfg.lora:
        merge_lora(model)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.eval(), tokenizer


def save_teacher(model: nn.Module, tokenizer, out_dir: str | Path, info: dict[str, Any]) -> None:
    """Write a loadable Hugging Face model directory: safetensors weights, config, tokenizer, `TEACHER_INFO`."""
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    (out_dir / TEACHER_INFO).write_text(json.dumps(info, indent=2) + "\n")


# --------------------------------------------------------------------------------------------------------------
# The Ray Train worker.


def train_teacher_loop(config: dict) -> None:
    """Ray Train worker: fine-tune this worker's replica of the teacher on its shard of the training groups.

    ``config``: ``train`` (a `TeacherTrainConfig`), ``groups`` (all `TrainingGroup` s; each epoch's seeded
    permutation is split by rank) and ``steps_per_epoch`` (optimizer steps, the same on every worker, so every
    worker reports equally often). Resumes from ``ray.train.get_checkpoint()`` at the step it stopped.
    """
    import ray.train
    import ray.train.torch
    from safetensors.torch import save_file

    from .raytrain import (
        CheckpointReporter,
        fault_hook,
        load_training_state,
        peak_memory_metrics,
        prepare_engine,
        warmup_cosine_scheduler,
    )

    cfg: TeacherTrainConfig = config["train"]
    groups: list[TrainingGroup] = config["groups"]
    steps_per_epoch = config["steps_per_epoch"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    model, tokenizer = load_causal_lm(cfg.teacher.model, device=device, dtype=torch.float32)
    make_trainable(model, cfg)
    model.train()
    prompts = PromptBuilder(tokenizer, cfg.teacher.prompt)
    scorer = AnswerScorer(model, prompts)
    frozen = FrozenStates(model, first_trained_block(model, cfg), tokenizer.padding_side, cfg.frozen_cache_mb << 20)
    sample = {k: v for k, v in group_batch(prompts, groups[: cfg.batch_size], device).items() if k != "sizes"}
    frozen.check(lambda: scorer(**sample))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=cfg.weight_decay
    )
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = warmup_cosine_scheduler(optimizer, cfg.warmup_steps, total_steps)
    step, history, optimizer_state = 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            load_trainable_into(model, Path(directory) / TRAINABLE_FILE)
            state, optimizer_state, history = load_training_state(directory, cfg, rank, world)
            step = int(state["step"])
            scheduler.load_state_dict(state["scheduler"])
    engine, optimizer, scheduler = prepare_engine(
        scorer, optimizer, scheduler, cfg, optimizer_state, rank, world, grad_accum=cfg.grad_accum
    )
    reporter = CheckpointReporter(
        cfg,
        rank,
        world,
        optimizer,
        scheduler,
        lambda directory, _state: save_file(trainable_state(model), str(directory / TRAINABLE_FILE)),
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    per_step = cfg.batch_size * cfg.grad_accum

    if step >= total_steps:  # a rerun of a finished run: hand back the last checkpoint
        last = history[-1] if history else {"epoch": cfg.epochs - 1, "step": step}
        reporter.report(last, history, epoch=last["epoch"], step=step)
        return
    sums: dict[str, float] = {}
    counted, started = 0, time.perf_counter()
    shuffled_epoch, mine = None, []
    while step < total_steps:
        epoch, within = divmod(step, steps_per_epoch)
        # Each epoch's seeded order; this rank's share (with frozen states kept, the same groups every epoch).
        if epoch != shuffled_epoch:
            generator = torch.Generator().manual_seed(cfg.seed + epoch)
            if frozen.enabled:
                shard = list(range(rank, len(groups), world))
                mine = [shard[i] for i in torch.randperm(len(shard), generator=generator).tolist()]
            else:
                mine = torch.randperm(len(groups), generator=generator).tolist()[rank::world]
            shuffled_epoch = epoch
        chunk = mine[within * per_step : (within + 1) * per_step]
        fault_hook(config, rank, step)
        for micro in range(cfg.grad_accum):
            ids = chunk[micro * cfg.batch_size : (micro + 1) * cfg.batch_size]
            batch = group_batch(prompts, [groups[i] for i in ids], device)
            keys = [(i, j) for i in ids for j in range(len(groups[i].doc_ids))]
            last_micro = micro == cfg.grad_accum - 1
            if cfg.strategy == "deepspeed":
                with autocast, frozen.applied(keys, batch["attention_mask"]):
                    terms = teacher_losses(engine, batch, cfg)
                engine.backward(terms["total"])
                engine.step()  # steps the optimizer and scheduler at the accumulation boundary
            else:
                # DDP all-reduces on the last micro-batch only.
                sync = engine.no_sync() if (world > 1 and not last_micro) else contextlib.nullcontext()
                with sync:
                    with autocast, frozen.applied(keys, batch["attention_mask"]):
                        terms = teacher_losses(engine, batch, cfg)
                    (terms["total"] / cfg.grad_accum).backward()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
            counted += 1
        if cfg.strategy == "ddp":
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        step += 1
        epoch_end = step % steps_per_epoch == 0
        if epoch_end or (cfg.report_every and step % cfg.report_every == 0):
            elapsed = time.perf_counter() - started
            metrics = {f"loss/{k}": v / counted for k, v in sums.items()}
            groups_done = counted * cfg.batch_size * world
            metrics.update(
                epoch=epoch,
                step=step,
                lr=scheduler.get_last_lr()[0],
                groups_per_s=groups_done / elapsed,
                frozen_replayed=frozen.counts["replayed"],
            )
            metrics.update(peak_memory_metrics(device, world))
            if rank == 0:
                history.append(metrics)
            reporter.report(metrics, history, epoch=epoch, step=step)
            sums, counted, started = {}, 0, time.perf_counter()
