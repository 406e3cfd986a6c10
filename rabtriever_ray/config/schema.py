"""The config dataclasses of the training jobs: a default and a help string per field (the sections they nest,
prompt, teacher, student and losses, are in `sections`; the offline jobs' configs in `offline`; the Serve app's in
`serving`).

Nested dataclasses are sections (dotted keys on the command line). How they are loaded from YAML and ``key=value``
overrides is `rabtriever_ray.config.loading`.

Keys that say where candidates come from (``candidates``, ``val_candidates``, ``round_pool``, ``negatives_from``)
are strings, as YAML and overrides give them; a config parses each one when it is built (`specs.parse_spec`: a
bad value, or a run file that does not exist, is a `ConfigError` naming the key) and keeps the result beside it as
``<key>_spec``, a `specs.CandidateSpec` (``cfg.round_pool_spec.k``). Those attributes are not fields: not keys,
not in `to_dict`; `dataclasses.replace` parses again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..specs import CANDIDATES, NEGATIVE_POOLS, ROUND_POOLS, parse_spec
from .base import ConfigError, check_at_least, check_gpu_shares, option
from .sections import LossConfig, StudentConfig, TeacherConfig

# --------------------------------------------------------------------------------------------------------------
# The configs.


# unlabelled_queries=auto: this file of the training folder, where the job builds the candidates.
AUTO_UNLABELLED = "auto"
UNLABELLED_FILE = "unlabelled_queries.jsonl"
RESUME_HELP = "same: resume only the same run (config, data files, teacher; else fail naming what differs); any: any"


@dataclass
class TeacherTrainConfig:
    """Fine-tuning the generative reranker (jobs/train_teacher.py): data, groups, loss, optimisation, cluster."""

    name: str = option(
        "teacher", "run name: the Ray Train run under storage_path, and runs/<name> by default"
    )
    out: str | None = option(None, "output model directory (default runs/<name>); written once, at the end")
    storage_path: str | None = option(
        None, "Ray Train storage for checkpoints (shared storage on a cluster); default <out>-ray"
    )
    overwrite: bool = option(False, "replace an existing output directory")
    data: str = option("", "training BEIR folder (empty: the bundled demo data)")
    split: str = option("train", "qrels split of the training queries")
    teacher: TeacherConfig = option(
        TeacherConfig(),
        "the model to fine-tune, its prompt (saved with the model) and how the validation pairs are scored",
    )
    max_queries: int | None = option(
        None, "seeded subset of training queries (queries without positives skipped)"
    )
    negatives: int = option(3, "negatives per training group (one positive + this many negatives)")
    negatives_from: str = option(
        "all", "where negatives are sampled: all (every other document) | bm25:K (top K by BM25)"
    )
    epochs: int = option(1, "passes over the training groups")
    batch_size: int = option(4, "groups per worker per micro-batch (each group is 1 + negatives pairs)")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    lr: float = option(5e-5, "peak AdamW learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    warmup_steps: int = option(5, "linear warm-up steps before cosine decay")
    grad_clip: float = option(1.0, "gradient-norm clip (0: off)")
    w_listwise: float = option(1.0, "weight of the listwise softmax cross-entropy over each group's scores")
    w_pointwise: float = option(0.0, "weight of the pointwise cross-entropy on the yes/no answer tokens")
    temperature: float = option(1.0, "temperature of the listwise softmax")
    seed: int = option(0, "seed for subsets, negatives, shuffling and LoRA initialisation")
    train_layers: int = option(
        0,
        "train only the top N decoder layers (0: every layer); the forward below them keeps no graph, so a step "
        "costs little more than scoring",
    )
    frozen_cache_mb: int = option(
        4096,
        "with train_layers, per worker: MiB of host memory for the frozen layers' output states, kept from each "
        "pair's first forward so later epochs run only the trained layers (0: off; off by itself where the "
        "frozen layers are not deterministic)",
    )
    lora: bool = option(
        False, "train LoRA adapters (peft) instead of all weights; merged into the saved model"
    )
    lora_r: int = option(16, "LoRA rank")
    lora_alpha: int = option(32, "LoRA alpha (scale alpha / r)")
    lora_dropout: float = option(0.05, "LoRA dropout")
    lora_targets: str = option(
        "all-linear", "peft target_modules: all-linear or comma-separated module names"
    )
    num_workers: int = option(1, "Ray Train workers")
    use_gpu: bool = option(False, "train on GPUs (bf16 autocast) and score the validation pairs on GPUs")
    cpus_per_worker: float = option(1.0, "CPUs per training worker")
    gpus_per_worker: float = option(1.0, "GPUs per training worker with use_gpu")
    strategy: Literal["ddp", "deepspeed"] = option("ddp", "data parallelism: torch DDP or DeepSpeed ZeRO")
    zero_stage: int = option(1, "DeepSpeed ZeRO stage (0, 1 or 2)")
    report_every: int = option(
        0, "optimizer steps between metric reports and checkpoints (0: once per epoch)"
    )
    max_failures: int = option(1, "worker failures to recover from (from the last checkpoint)")
    num_to_keep: int = option(
        1, "checkpoints kept (a full fine-tune checkpoint holds weights and AdamW state)"
    )
    resume: Literal["same", "any"] = option("same", RESUME_HELP)
    val_data: str | None = option(
        "", "validation BEIR folder (empty: the training folder; none: no validation)"
    )
    val_split: str = option("dev", "qrels split of the validation queries")
    max_val_queries: int | None = option(None, "seeded subset of validation queries")
    val_candidates: str = option(
        "all",
        "validation candidates per query: all (every document; refused beyond 1,000,000 queries x documents) "
        "| bm25:K | random:K | a TREC run file",
    )
    validate_before: bool = option(
        True, "also score the validation pairs with the model before training (false: only after)"
    )
    teacher_actors: int = option(1, "actors scoring the validation pairs")
    teacher_cpus: float = option(1.0, "CPUs per validation scoring actor")
    teacher_gpus: float = option(1.0, "GPUs per validation scoring actor with use_gpu")

    def __post_init__(self) -> None:
        check_at_least(
            self, 1, "negatives", "epochs", "batch_size", "grad_accum", "num_workers", "teacher_actors"
        )
        check_at_least(self, 1, "lora_r", "lora_alpha")
        check_at_least(
            self,
            0,
            "warmup_steps",
            "report_every",
            "w_listwise",
            "w_pointwise",
            "max_failures",
            "train_layers",
            "frozen_cache_mb",
        )
        if self.w_listwise == self.w_pointwise == 0:
            raise ConfigError("w_listwise and w_pointwise are both 0: nothing to train")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigError(f"lr and temperature must be > 0, got {self.lr} and {self.temperature}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        check_gpu_shares(self, "gpus_per_worker", "teacher_gpus")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        self.negatives_from_spec = parse_spec(
            self.negatives_from, "negatives_from", NEGATIVE_POOLS, ConfigError
        )
        self.val_candidates_spec = parse_spec(self.val_candidates, "val_candidates", CANDIDATES, ConfigError)


@dataclass
class DistillConfig:
    """A distillation run: data, teacher, student, loss, optimisation and the Ray cluster shape it uses."""

    name: str = option("demo", "run name: the Ray Train run under storage_path, and runs/<name> by default")
    out_dir: str | None = option(
        None, "where report.json, checkpoint/ and training_curves.png go (default runs/<name>)"
    )
    storage_path: str | None = option(
        None, "Ray Train storage (shared storage on a cluster); default <out_dir>/ray"
    )
    data_dir: str = option("", "folder holding the train and val data folders; empty: the bundled demo data")
    train_data: str = option("", "train BEIR folder under data_dir (empty: data_dir itself)")
    train_split: str = option("train", "qrels split of the training queries")
    val_data: str = option("", "validation BEIR folder under data_dir (empty: data_dir itself)")
    val_split: str = option("dev", "qrels split of the validation queries")
    teacher: TeacherConfig = option(
        TeacherConfig(),
        "the teacher (also the student's frozen backbone and prompt): a section, a teacher YAML or a model spec",
    )
    student: StudentConfig = option(StudentConfig(), "trainable parts")
    loss: LossConfig = option(LossConfig(), "loss mix")
    finetune_teacher: bool = option(
        True,
        "first fine-tune the teacher on the training split (the recipe in finetune) and distil from the result; "
        "skipped when the teacher was written by jobs/train_teacher.py or the pairs come pre-scored "
        "(teacher_data, val_teacher_data)",
    )
    finetune: TeacherTrainConfig = option(
        TeacherTrainConfig(
            negatives=3, train_layers=8, lr=2e-4, batch_size=4, warmup_steps=3, report_every=10
        ),
        "the fine-tuning recipe (jobs/train_teacher.py's keys); its teacher, data, validation, seed and output "
        "come from this config (output: <out_dir>/teacher), and its max_queries is at most max_train_queries",
    )
    teacher_data: str | None = option(
        None, "pre-scored Parquet from jobs/score_teacher.py to train on, instead of the live teacher stage"
    )
    val_teacher_data: str | None = option(
        None, "pre-scored validation Parquet (jobs/score_teacher.py) instead of scoring the validation pairs"
    )
    candidates: str = option(
        "random:3",
        "training candidates per query: all | bm25:K | random:K (K drawn uniformly, seeded) | a TREC run file; "
        "the student is judged on every candidate it ranks, so uniform draws over many queries teach it the whole "
        "of the teacher's ranking",
    )
    val_candidates: str = option(
        "all",
        "validation candidates per query: all (every document; refused beyond 1,000,000 queries x documents) "
        "| bm25:K | random:K | a TREC run file",
    )
    max_train_queries: int | None = option(None, "seeded subset of training queries")
    unlabelled_queries: str = option(
        "auto",
        "more training queries, without labels, that the teacher scores like the others (the teacher's fine-tuning "
        "and the bi-encoder baselines use only the labelled ones): rest (the training split's queries left out by "
        "max_train_queries, labels unused) | a queries file as queries.jsonl (a relative path is looked up in the "
        "training folder first) | auto: the training folder's unlabelled_queries.jsonl when it has one and the job "
        "builds the candidates (the bundled demo ships 600), else none | empty: none",
    )
    max_unlabelled_queries: int | None = option(None, "seeded subset of the unlabelled queries")
    max_val_queries: int | None = option(None, "seeded subset of validation queries")
    epochs: int = option(
        5, "passes over the training pairs (after the first, the teacher outputs are reused)"
    )
    batch_size: int = option(64, "pairs per worker per step")
    lr: float = option(1e-3, "peak AdamW learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_steps: int = option(20, "linear warm-up steps before cosine decay")
    grad_clip: float = option(1.0, "gradient-norm clip (0: off)")
    seed: int = option(0, "seed for subsets, random:K candidates, shuffling and initialisation")
    num_workers: int = option(1, "Ray Train workers")
    use_gpu: bool = option(False, "train and score on GPUs (gpus_per_worker, teacher_gpus)")
    cpus_per_worker: float = option(1.0, "CPUs per training worker")
    gpus_per_worker: float = option(
        1.0, "GPUs per training worker with use_gpu (a fraction shares one GPU with the teacher actors)"
    )
    teacher_actors: int = option(1, "teacher actors streaming the training pairs")
    teacher_cpus: float = option(1.0, "CPUs per teacher actor")
    teacher_gpus: float = option(
        1.0,
        "GPUs per teacher actor (and per round sampler) with use_gpu; 0.5 + gpus_per_worker=0.5 fits one GPU",
    )
    teacher_threads: int = option(
        0,
        "torch threads of each teacher actor streaming the training pairs; 0: on one node (local Ray) the node's "
        "CPUs shared among the actors, since the training workers mostly wait for the teacher; on several nodes "
        "as many as its CPUs",
    )
    teacher_batch_size: int = option(
        256, "pairs per teacher actor call (more pairs share more document prefixes)"
    )
    persist_teacher: bool = option(True, "keep teacher outputs until the run ends: a restart reads them back")
    teacher_cache_mb: int = option(
        4096,
        "per training worker: MiB of teacher outputs kept in memory for the epochs after the first; the rest "
        "spill to local disk (Arrow files, read back memory-mapped)",
    )
    embedding_cache_mb: int = option(
        2048,
        "per training worker: MiB of cached frozen query and document embeddings (half each); past it the least "
        "recently used are encoded again when they come back",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = option(
        "PACK", "placement of the training workers (SPREAD: one per node where possible)"
    )
    strategy: Literal["ddp", "deepspeed"] = option(
        "ddp", "data parallelism: torch DDP, or DeepSpeed (deepspeed.initialize with ZeRO)"
    )
    zero_stage: int = option(1, "DeepSpeed ZeRO stage (0, 1 or 2; the trainable parts are small)")
    rounds: int = option(
        1, "training rounds; rounds after the first train on pairs the current student samples"
    )
    round_k: int = option(4, "documents sampled per query from the student's softmax in each later round")
    round_tau: float = option(1.0, "temperature of the student's softmax for the round sampling")
    round_pool: str = option(
        "all",
        "candidate pool the student samples from in each later round: all (every document; refused beyond "
        "1,000,000 queries x documents) | bm25:K | a run file | student:K (the top K of the whole corpus by the "
        "previous round's student's own first stage, exact FAISS search; round 0 trains on candidates)",
    )
    round_epochs: int | None = option(None, "epochs of each later round (default: epochs)")
    max_failures: int = option(1, "worker failures to recover from (from the last checkpoint)")
    num_to_keep: int = option(2, "checkpoints kept")
    resume: Literal["same", "any"] = option("same", RESUME_HELP)
    baselines: list[str] = option(
        ["minilm", "minilm-ft"],
        "bi-encoders the report ranks the validation candidates with, beside BM25: minilm (all-MiniLM-L6-v2 "
        "zero-shot), minilm-ft (fine-tuned on the labelled training queries); needs the baselines extra",
    )
    cost_queries: int = option(
        4,
        "validation queries on which the teacher's and Rabtriever's per-query cost is timed at the end (0: none)",
    )
    verbose: bool = option(
        False, "show Ray's own log lines and progress on the console (otherwise they go to <out_dir>/job.log)"
    )

    # finetune keys the distillation sets from its own (data, teacher, validation, seed, output): not user keys.
    DERIVED: ClassVar[dict[str, tuple[str, ...]]] = {
        "finetune": (
            "name",
            "out",
            "storage_path",
            "overwrite",
            "data",
            "split",
            "teacher",
            "val_data",
            "val_split",
            "max_val_queries",
            "val_candidates",
            "validate_before",
            "seed",
            "use_gpu",
        )
    }

    @property
    def builds_candidates(self) -> bool:
        """Whether the job builds every training pair's candidates itself (all, bm25:K, random:K; with rounds, an
        all or bm25:K pool), so that unlabelled queries can join: not from a run file, a student pool or
        ``teacher_data``."""
        pooled_elsewhere = self.rounds > 1 and self.round_pool_spec.kind in ("run", "student")
        return not (self.candidates_spec.is_run or self.teacher_data or pooled_elsewhere)

    def __post_init__(self) -> None:
        plain = TeacherTrainConfig()
        for key in self.DERIVED["finetune"]:
            if getattr(self.finetune, key) != getattr(plain, key):
                raise ConfigError(
                    f"finetune.{key} is set by the distillation from its own keys (train_data, teacher, val_*, "
                    "seed, use_gpu, out_dir); set those instead"
                )
        check_at_least(
            self,
            1,
            "epochs",
            "batch_size",
            "num_workers",
            "teacher_actors",
            "teacher_batch_size",
            "embedding_cache_mb",
            "rounds",
            "round_k",
        )
        check_at_least(self, 0, "cost_queries", "teacher_cache_mb", "teacher_threads")
        if self.round_epochs is not None and self.round_epochs < 1:
            raise ConfigError(f"round_epochs must be >= 1, got {self.round_epochs}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        check_gpu_shares(self, "gpus_per_worker", "teacher_gpus")
        if self.round_tau <= 0:
            raise ConfigError(f"round_tau must be > 0, got {self.round_tau}")
        self.candidates_spec = parse_spec(self.candidates, "candidates", CANDIDATES, ConfigError)
        self.val_candidates_spec = parse_spec(self.val_candidates, "val_candidates", CANDIDATES, ConfigError)
        self.round_pool_spec = parse_spec(self.round_pool, "round_pool", ROUND_POOLS, ConfigError)
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        unknown = [m for m in self.baselines if m not in ("minilm", "minilm-ft")]
        if unknown:
            raise ConfigError(f"baselines: unknown {unknown}; choose from minilm, minilm-ft")
        if self.unlabelled_queries not in ("", AUTO_UNLABELLED) and not self.builds_candidates:
            raise ConfigError(
                "unlabelled_queries are scored by the live teacher over candidates built in the job: they need "
                "candidates all, bm25:K or random:K, no teacher_data, and (with rounds) round_pool all or bm25:K"
            )
