"""The config dataclasses of every job: a default and a help string per field (the Serve app's are in `serving`).

Nested dataclasses are sections (dotted keys on the command line). How they are loaded from YAML and ``key=value``
overrides is `rabtriever_ray.config.loading`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from .base import ConfigError, _at_least, _gpu_shares, actor_range, option

# --------------------------------------------------------------------------------------------------------------
# The configs.


@dataclass
class PromptConfig:
    """How (query, document) pairs are rendered for the teacher and the student."""

    instruction: str = option(
        "Is this document relevant to the query?", "question asked after the document and the query"
    )
    answer_hint: str = option("Answer yes or no.", "appended to the instruction")
    system: str | None = option(None, "system message; None keeps the chat template's default")
    doc_label: str = option("Document", "label written before the document")
    query_label: str = option("Query", "label written before the query")
    answer_yes: str = option(
        "yes", "answer word for relevant; must be a single token after the answer prompt"
    )
    answer_no: str = option(
        "no", "answer word for not relevant; must be a single token after the answer prompt"
    )
    enable_thinking: bool = option(
        False, "passed to chat templates with a thinking mode (Qwen3); false: the answer follows the header"
    )
    answer_prefix: str = option(
        "", "text after the chat template's generation prompt, before the answer (e.g. 'Answer:')"
    )
    max_doc_tokens: int = option(512, "documents are cut at the end to this many tokens")
    max_query_tokens: int = option(
        256, "queries are cut from the start (latest turns survive) to this many tokens"
    )

    def __post_init__(self) -> None:
        _at_least(self, 1, "max_doc_tokens", "max_query_tokens")
        if not self.answer_yes.strip() or not self.answer_no.strip() or self.answer_yes == self.answer_no:
            raise ConfigError(
                f"answer_yes/answer_no must be distinct and non-empty, got {self.answer_yes!r}/{self.answer_no!r}"
            )


@dataclass
class TeacherConfig:
    """The generative reranker: which model, how it is prompted and batched.

    Where a config nests one (``teacher``), a plain string stands for the section: a model spec sets ``model``
    (``teacher=runs/my_teacher``), a path ending in ``.yaml`` loads the section from that file.
    """

    SHORTHAND: ClassVar[str] = "model"

    model: str = option("smollm2-135m", "model spec: smollm2-135m, tiny-random-llama, a HF id or a directory")
    prompt: PromptConfig = option(PromptConfig(), "prompt template and truncation")
    max_batch_tokens: int = option(8192, "padded tokens per forward batch (rows x longest sequence)")
    share_prefix: bool = option(True, "run a prompt prefix shared by several pairs (same document) once")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "auto: bf16 on GPU, fp32 on CPU"
    )

    def __post_init__(self) -> None:
        _at_least(self, 1, "max_batch_tokens")


@dataclass
class StudentConfig:
    """Rabtriever's trainable parts on top of the frozen backbone."""

    predictor_hidden: int = option(1024, "hidden width of the predictor MLP")
    input_norm: bool = option(True, "LayerNorm the query and document embeddings before the predictor MLP")
    query_mean: bool = option(
        True,
        "query embedding = answer-position state + mean state of the query's tokens (standardised per dimension "
        "for the predictor); false: the answer-position state alone",
    )
    proj_dim: int = option(256, "dimension of the first-stage projections q_proj / d_proj")
    seed: int = option(0, "seed for the trainable parts' initialisation")

    def __post_init__(self) -> None:
        _at_least(self, 1, "predictor_hidden", "proj_dim")


@dataclass
class LossConfig:
    """The distillation loss mix; each term is logged on its own."""

    w_jepa: float = option(0.1, "weight of the JEPA loss: predicted vs teacher hidden state")
    w_rkl: float = option(1.0, "weight of the reverse KL between student and teacher LM-head distributions")
    w_list: float = option(1.0, "weight of the listwise KL of first-stage scores against teacher scores")
    w_rank: float = option(
        1.0, "weight of the listwise KL of the predictor's own scores against teacher scores"
    )
    temperature: float = option(1.0, "temperature of the KL terms")
    jepa_kind: Literal["mse", "smooth_l1", "cosine"] = option("mse", "distance used by the JEPA loss")

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        _at_least(self, 0, "w_jepa", "w_rkl", "w_list", "w_rank")


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
        _at_least(self, 1, "negatives", "epochs", "batch_size", "grad_accum", "num_workers", "teacher_actors")
        _at_least(self, 1, "lora_r", "lora_alpha")
        _at_least(
            self, 0, "warmup_steps", "report_every", "w_listwise", "w_pointwise", "max_failures", "train_layers"
        )
        if self.w_listwise == self.w_pointwise == 0:
            raise ConfigError("w_listwise and w_pointwise are both 0: nothing to train")
        if self.lr <= 0 or self.temperature <= 0:
            raise ConfigError(f"lr and temperature must be > 0, got {self.lr} and {self.temperature}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        _gpu_shares(self, "gpus_per_worker", "teacher_gpus")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.negatives_from != "all" and not self.negatives_from.startswith("bm25:"):
            raise ConfigError(f"negatives_from must be all or bm25:K, got {self.negatives_from!r}")



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
    cost_queries: int = option(
        4, "validation queries on which the teacher's and Rabtriever's per-query cost is timed at the end (0: none)"
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
        _at_least(
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
        _at_least(self, 0, "cost_queries", "teacher_cache_mb")
        if self.round_epochs is not None and self.round_epochs < 1:
            raise ConfigError(f"round_epochs must be >= 1, got {self.round_epochs}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        _gpu_shares(self, "gpus_per_worker", "teacher_gpus")
        if self.round_tau <= 0:
            raise ConfigError(f"round_tau must be > 0, got {self.round_tau}")
        if self.round_pool.startswith("student:"):
            from ..rounds import student_pool_size  # with the policy it parses; imports torch, so only here

            student_pool_size(self.round_pool)
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


# --------------------------------------------------------------------------------------------------------------
# The offline jobs around distillation: scoring, indexing, evaluation. Keys in REQUIRED have no usable default.

_TEACHER_HELP = "the teacher: a section, a teacher YAML (configs/teacher/*.yaml) or a model spec"


@dataclass
class ScoreTeacherConfig:
    """Scoring candidate pairs with the teacher on Ray Data (jobs/score_teacher.py; `pipeline.write_teacher_scores`)."""

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
        "comma-separated: frequency, bm25, minilm, llm-embed, teacher, rabtriever, rabtriever-search",
    )
    out: str | None = option(None, "results JSON (written atomically)")
    checkpoint: str | None = option(None, "distillation checkpoint (rabtriever methods)")
    index: str | None = option(None, "jobs/index.py output for rabtriever-search")
    teacher: TeacherConfig = option(
        TeacherConfig(), _TEACHER_HELP + "; the student uses the prompt its checkpoint records"
    )
    max_queries: int | None = option(None, "seeded subset of this many queries")
    seed: int = option(0, "seed of the query subset")
    candidates: str = option("all", "candidates of the rerankers: all | bm25:K | TREC run file")
    frequency_data: str | None = option(
        None, "BEIR folder whose qrels give the frequency prior (None: data)"
    )
    frequency_split: str = option("train", "qrels split of the frequency prior")
    exclude_self: bool = option(False, "drop a query's own id from its results")
