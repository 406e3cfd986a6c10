"""The config dataclasses of every job: a default and a help string per field (the sections they nest, prompt,
teacher, student and losses, are in `sections`; the Serve app's in `serving`).

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
from .base import ConfigError, actor_range, check_at_least, check_gpu_shares, option
from .sections import LossConfig, StudentConfig, TeacherConfig

# --------------------------------------------------------------------------------------------------------------
# The configs.


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
        "| bm25:K | a TREC run file",
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
        "come from this config (output: <out_dir>/teacher)",
    )
    teacher_data: str | None = option(
        None, "pre-scored Parquet from jobs/score_teacher.py to train on, instead of the live teacher stage"
    )
    val_teacher_data: str | None = option(
        None, "pre-scored validation Parquet (jobs/score_teacher.py) instead of scoring the validation pairs"
    )
    candidates: str = option("bm25:8", "training candidates per query: all | bm25:K | a TREC run file")
    val_candidates: str = option(
        "all",
        "validation candidates per query: all (every document; refused beyond 1,000,000 queries x documents) "
        "| bm25:K | a TREC run file",
    )
    max_train_queries: int | None = option(None, "seeded subset of training queries")
    max_val_queries: int | None = option(None, "seeded subset of validation queries")
    epochs: int = option(
        5, "passes over the training pairs (after the first, the teacher outputs are reused)"
    )
    batch_size: int = option(64, "pairs per worker per step")
    lr: float = option(1e-3, "peak AdamW learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup_steps: int = option(20, "linear warm-up steps before cosine decay")
    grad_clip: float = option(1.0, "gradient-norm clip (0: off)")
    seed: int = option(0, "seed for subsets, shuffling and initialisation")
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
        check_at_least(self, 0, "cost_queries", "teacher_cache_mb")
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


# --------------------------------------------------------------------------------------------------------------
# The offline jobs around distillation: scoring, indexing, evaluation. Keys in REQUIRED have no usable default.

_TEACHER_HELP = "the teacher: a section, a teacher YAML (configs/teacher/*.yaml) or a model spec"


@dataclass
class ScoreTeacherConfig:
    """Scoring candidate pairs with the teacher on Ray Data (jobs/score_teacher.py; `teacher_scores.write_teacher_scores`)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("data", "out")

    data: str = option("", "BEIR folder (corpus.jsonl, queries.jsonl, qrels/); required")
    split: str | None = option(None, "qrels split; its queries are scored (None: all queries)")
    out: str = option("", "output folder (written atomically); required")
    teacher: TeacherConfig = option(TeacherConfig(), _TEACHER_HELP)
    candidates: str = option("all", "all | bm25:K | path to a TREC run file")
    training: bool = option(
        False,
        "training pairs: add qrel positives missing from the candidates, and keep each query's candidate list whole "
        "in one written block",
    )
    max_queries: int | None = option(None, "seeded subset of this many queries")
    seed: int = option(0, "seed of the query subset")
    actors: str = option("1:1", "teacher actor pool MIN:MAX (or N)")
    gpus_per_actor: float | None = option(None, "GPUs per teacher actor; None: 1 when the cluster has GPUs")
    cpus_per_actor: float = option(1.0, "CPUs per teacher actor")
    batch_size: int = option(64, "rows per actor call (with training: about, whole candidate lists per call)")
    on_bad_row: Literal["fail", "skip"] = option("fail", "bad input rows: stop or skip (rejects.jsonl)")
    overwrite: bool = option(False, "replace a finished out")

    def __post_init__(self) -> None:
        actor_range(self.actors)
        self.candidates_spec = parse_spec(self.candidates, "candidates", CANDIDATES, ConfigError)


@dataclass
class IndexConfig:
    """Encoding a corpus with a checkpoint's student and building a FAISS index (jobs/index.py; `index.build_index`)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("checkpoint", "data", "out")

    checkpoint: str = option("", "distillation checkpoint folder (student.safetensors); required")
    data: str = option("", "BEIR folder; its corpus is indexed; required")
    out: str = option("", "index folder (written atomically); required")
    index_type: Literal["flat", "hnsw", "ivf"] = option("flat", "FAISS index over the first-stage vectors")
    hnsw_m: int = option(32, "HNSW neighbours per node")
    nlist: int | None = option(None, "IVF lists (None: 4 sqrt(n))")
    teacher: TeacherConfig | None = option(
        None, "backbone and prompt for a checkpoint that records none (a teacher YAML or a model spec)"
    )
    actors: str = option("1:1", "encoder actor pool MIN:MAX (or N)")
    gpus_per_actor: float | None = option(None, "GPUs per encoder actor; None: 1 when the cluster has GPUs")
    cpus_per_actor: float = option(1.0, "CPUs per encoder actor")
    batch_size: int = option(256, "documents per actor call")
    on_bad_row: Literal["fail", "skip"] = option("fail", "bad corpus rows: stop or skip")
    overwrite: bool = option(False, "replace a finished out")

    def __post_init__(self) -> None:
        actor_range(self.actors)


@dataclass
class EvaluateConfig:
    """Evaluating baselines, the teacher and Rabtriever on a BEIR split (jobs/evaluate.py; `evaluate.run_evaluation`)."""

    REQUIRED: ClassVar[tuple[str, ...]] = ("data", "split")

    data: str = option("", "BEIR folder (corpus.jsonl, queries.jsonl, qrels/); required")
    split: str = option("", "qrels split to evaluate (e.g. dev, test); required")
    methods: list[str] = option(
        ["bm25", "llm-embed", "teacher"],
        "comma-separated: frequency, bm25, minilm, minilm-ft, llm-embed, teacher, rabtriever, rabtriever-search",
    )
    out: str | None = option(None, "results JSON (written atomically)")
    checkpoint: str | None = option(None, "distillation checkpoint (rabtriever methods)")
    index: str | None = option(None, "jobs/index.py output for rabtriever-search")
    teacher: TeacherConfig = option(
        TeacherConfig(), _TEACHER_HELP + "; the student uses the prompt its checkpoint records"
    )
    max_queries: int | None = option(None, "seeded subset of this many queries")
    seed: int = option(0, "seed of the query subsets and of minilm-ft's fine-tuning")
    candidates: str = option("all", "candidates of the rerankers: all | bm25:K | TREC run file")
    train_data: str | None = option(None, "BEIR folder of the training split (None: data)")
    train_split: str = option("train", "qrels split of the training queries (frequency prior, minilm-ft)")
    max_train_queries: int | None = option(None, "seeded subset of the training queries minilm-ft trains on")
    exclude_self: bool = option(False, "drop a query's own id from its results")

    def __post_init__(self) -> None:
        self.candidates_spec = parse_spec(self.candidates, "candidates", CANDIDATES, ConfigError)
