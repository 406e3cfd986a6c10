"""Typed configuration: dataclasses with defaults and help, YAML files, and ``key=value`` overrides.

Every job builds its config the same way::

    cfg = load_config(TeacherConfig, "configs/teacher/esconv_strategy.yaml", ["prompt.max_doc_tokens=256"])

Nested dataclasses are addressed with dotted keys. Values from the command line are converted to the field's
type; values from YAML are checked against it. An unknown key or a value of the wrong type raises `ConfigError`
naming the key (and the file), so a typo never silently falls back to a default.

README.md's configuration reference is generated from these dataclasses: ``python -m rabtriever_ray.config
--write-readme`` rewrites it, ``--check`` tells whether it is current.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value that cannot be used; the message names it."""


def option(default: Any, help: str, **kwargs: Any) -> Any:  # noqa: A002 - mirrors argparse
    """A dataclass field with a default and a help string (mutable defaults are copied per instance)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    if dataclasses.is_dataclass(default):
        return field(default_factory=lambda: dataclasses.replace(default), metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


def _gpu_shares(config: Any, *names: str) -> None:
    """Raise `ConfigError` naming the first field of ``names`` outside (0, 8]: a GPU share or count per actor."""
    for name in names:
        if not 0 < getattr(config, name) <= 8:
            raise ConfigError(f"{name} must be in (0, 8], got {getattr(config, name)}")


def _at_least(config: Any, minimum: float, *names: str) -> None:
    """Raise `ConfigError` naming the first field of ``names`` below ``minimum``."""
    for name in names:
        if getattr(config, name) < minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {getattr(config, name)}")


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
    """The generative reranker: which model, how it is prompted and batched."""

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
    teacher: str = option("smollm2-135m", "teacher model spec (any spec load_causal_lm accepts)")
    prompt: PromptConfig = option(PromptConfig(), "prompt template and truncation")
    max_batch_tokens: int = option(8192, "teacher/encoder padded tokens per forward batch")
    student: StudentConfig = option(StudentConfig(), "trainable parts")
    loss: LossConfig = option(LossConfig(), "loss mix")
    teacher_data: str | None = option(
        None, "pre-scored Parquet from jobs/score_teacher.py to train on, instead of the live teacher stage"
    )
    val_teacher_data: str | None = option(
        None, "pre-scored validation Parquet (jobs/score_teacher.py) instead of scoring the validation pairs"
    )
    candidates: str = option("bm25:8", "training candidates per query: all | bm25:K | a TREC run file")
    val_candidates: str = option("all", "validation candidates per query: all | bm25:K | a TREC run file")
    max_train_queries: int | None = option(None, "seeded subset of training queries")
    max_val_queries: int | None = option(None, "seeded subset of validation queries")
    epochs: int = option(
        20, "passes over the training pairs (after the first, the teacher outputs are reused)"
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
    round_pool: str = option("all", "candidate pool the student samples from: all | bm25:K | a run file")
    round_epochs: int | None = option(None, "epochs of each later round (default: epochs)")
    max_failures: int = option(1, "worker failures to recover from (from the last checkpoint)")
    num_to_keep: int = option(2, "checkpoints kept")

    def __post_init__(self) -> None:
        _at_least(
            self,
            1,
            "epochs",
            "batch_size",
            "num_workers",
            "teacher_actors",
            "teacher_batch_size",
            "rounds",
            "round_k",
        )
        if self.round_epochs is not None and self.round_epochs < 1:
            raise ConfigError(f"round_epochs must be >= 1, got {self.round_epochs}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        _gpu_shares(self, "gpus_per_worker", "teacher_gpus")
        if self.round_tau <= 0:
            raise ConfigError(f"round_tau must be > 0, got {self.round_tau}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")


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
    model: str = option("smollm2-135m", "model to fine-tune (any spec load_causal_lm accepts)")
    prompt: PromptConfig = option(PromptConfig(), "prompt template and truncation (saved with the model)")
    max_batch_tokens: int = option(8192, "padded tokens per forward batch when scoring the validation pairs")
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
    val_candidates: str = option("all", "validation candidates per query: all | bm25:K | a TREC run file")
    validate_before: bool = option(
        True, "also score the validation pairs with the model before training (false: only after)"
    )
    teacher_actors: int = option(1, "actors scoring the validation pairs")
    teacher_cpus: float = option(1.0, "CPUs per validation scoring actor")
    teacher_gpus: float = option(1.0, "GPUs per validation scoring actor with use_gpu")

    def __post_init__(self) -> None:
        _at_least(self, 1, "negatives", "epochs", "batch_size", "grad_accum", "num_workers", "teacher_actors")
        _at_least(self, 1, "lora_r", "lora_alpha", "max_batch_tokens")
        _at_least(self, 0, "warmup_steps", "report_every", "w_listwise", "w_pointwise", "max_failures")
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


# --------------------------------------------------------------------------------------------------------------
# Loading and overriding.


def load_config(cls: type, path: str | Path | None = None, overrides: Iterable[str] = ()) -> Any:
    """Build ``cls`` from its defaults, then a YAML file, then ``key=value`` overrides (in that order)."""
    values: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            loaded = yaml.safe_load(path.read_text())
        except FileNotFoundError as err:
            raise ConfigError(f"config file not found: {path}") from err
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(loaded).__name__}")
        values = _check_mapping(cls, loaded or {}, prefix="", source=source)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        field_type = _field_type(cls, key.strip())
        _set_dotted(values, key.strip(), _parse_string(raw, field_type, key.strip()))
    return _build(cls, values, prefix="", source=source)


def actor_range(text: str) -> tuple[int, int]:
    """``MIN:MAX`` or ``N`` -> (min, max) of an actor pool: the ``type`` of the jobs' ``--actors`` argument."""
    import argparse

    lo, _, hi = text.partition(":")
    try:
        return int(lo), int(hi or lo)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--actors expects MIN:MAX or N, got {text!r}") from err


def from_dict(cls: type, mapping: Mapping[str, Any], source: str = "dict") -> Any:
    """Build ``cls`` from a plain dict (as `to_dict` writes it), checking keys and types like a YAML file."""
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"{source}: expected a mapping, got {type(mapping).__name__}")
    return _build(cls, _check_mapping(cls, mapping, prefix="", source=source), prefix="", source=source)


def to_dict(config: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config dataclass."""
    return dataclasses.asdict(config)


def prompt_differences(recorded: Mapping[str, Any], prompt: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, recorded value, value in prompt)`` for each field of ``prompt`` (a `PromptConfig` as a dict, or
    part of one) that differs from ``recorded``, sorted by key.

    A field the record lacks (written before the field existed) counts as its default, which is what that
    record's prompts were rendered with.
    """
    defaults = to_dict(PromptConfig())
    return [
        (key, recorded.get(key, defaults.get(key)), value)
        for key, value in sorted(prompt.items())
        if recorded.get(key, defaults.get(key)) != value
    ]


def config_help(cls: type, prefix: str = "") -> str:
    """One line per key: ``key (type, default): help``; nested dataclasses are flattened with dots."""
    return "\n".join(
        f"  {key} ({_type_name(field_type)}, default {_default(f)!r}): {f.metadata.get('help', '')}"
        for key, f, field_type in _flat_fields(cls, prefix)
        if not dataclasses.is_dataclass(field_type)
    )


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _flat_fields(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, type) of every field in order; a nested dataclass comes just before its own keys."""
    for name, (f, field_type) in _fields(cls).items():
        yield f"{prefix}{name}", f, field_type
        if dataclasses.is_dataclass(field_type):
            yield from _flat_fields(field_type, f"{prefix}{name}.")


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _unknown(key: str, known: Iterable[str], source: str) -> ConfigError:
    known = sorted(known)
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return ConfigError(f"{source}: unknown config key {key!r}{hint}")


def _field_type(cls: type, dotted: str) -> Any:
    current: Any = cls
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        fields = _fields(current)
        if part not in fields:
            raise _unknown(dotted, [".".join(parts[:depth] + [k]) for k in fields], "command line")
        current = fields[part][1]
    if dataclasses.is_dataclass(current):
        raise ConfigError(
            f"command line: {dotted!r} is a section; set one of its keys, e.g. {dotted}.<key>=..."
        )
    return current


def _set_dotted(values: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        values = values.setdefault(part, {})
    values[last] = value


def _check_mapping(cls: type, mapping: Mapping[str, Any], prefix: str, source: str) -> dict[str, Any]:
    fields = _fields(cls)
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str):
            raise ConfigError(
                f"{source}: key {prefix}{key!r} is not a string (YAML reads yes/no/on/off/true/false as booleans; quote it)"
            )
        if key not in fields:
            raise _unknown(dotted, [f"{prefix}{k}" for k in fields], source)
        field_type = fields[key][1]
        if dataclasses.is_dataclass(field_type):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {dotted!r} must be a mapping of its keys, got {value!r}")
            out[key] = _check_mapping(field_type, value, f"{dotted}.", source)
        else:
            out[key] = _check_value(value, field_type, dotted, source)
    return out


def _build(cls: type, values: Mapping[str, Any], prefix: str, source: str) -> Any:
    kwargs = {}
    for name, (_f, field_type) in _fields(cls).items():
        if dataclasses.is_dataclass(field_type):
            kwargs[name] = _build(field_type, values.get(name, {}), f"{prefix}{name}.", source)
        elif name in values:
            kwargs[name] = values[name]
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {prefix}{err}") from err


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "|".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _is_optional(tp: Any) -> tuple[bool, Any]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return True, args[0]
    return False, tp


def _check_value(value: Any, tp: Any, key: str, source: str) -> Any:
    optional, inner = _is_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key!r} must not be null (expected {_type_name(tp)})")
    origin = typing.get_origin(inner)
    if origin is Literal:
        if value not in typing.get_args(inner):
            raise ConfigError(f"{source}: {key!r} must be one of {_type_name(inner)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key!r} must be a list, got {value!r}")
        (item_type,) = typing.get_args(inner)
        return [_check_value(v, item_type, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if inner is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if inner in (int, float, str, bool) and (
        not isinstance(value, inner) or (inner is int and isinstance(value, bool))
    ):
        hint = " (quote it in YAML)" if inner is str and isinstance(value, bool) else ""
        raise ConfigError(
            f"{source}: {key!r} expects {inner.__name__}, got {type(value).__name__} {value!r}{hint}"
        )
    return value


_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _parse_string(raw: str, tp: Any, key: str) -> Any:
    optional, inner = _is_optional(tp)
    text = raw.strip()
    if optional and text.lower() in ("none", "null", "~"):
        return None
    try:
        if inner is bool:
            if text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
            raise ValueError
        if inner is int:
            return int(text)
        if inner is float:
            return float(text)
        if typing.get_origin(inner) is list:
            parsed = yaml.safe_load(text) if text.startswith("[") else [t for t in text.split(",") if t]
            (item_type,) = typing.get_args(inner)
            if item_type is not str:
                parsed = [_parse_string(str(v), item_type, key) for v in parsed]
            return _check_value(parsed, inner, key, "command line")
    except (ValueError, yaml.YAMLError) as err:
        raise ConfigError(f"command line: {key}={raw!r} is not a valid {_type_name(inner)}") from err
    return _check_value(raw if inner is str else text, inner, key, "command line")


# --------------------------------------------------------------------------------------------------------------
# Serving (rabtriever_ray/serve.py).


@dataclass
class ServeResources:
    """One Serve deployment's replicas and resources; ``max_replicas > min_replicas`` turns on autoscaling."""

    num_cpus: float = option(
        0.25,
        "CPUs reserved per replica; Ray sets OMP_NUM_THREADS (torch's threads) to max(1, floor(num_cpus))",
    )
    num_gpus: float = option(0.0, "GPUs per replica (a fraction shares one GPU between deployments)")
    min_replicas: int = option(1, "replicas (the lower bound when autoscaling)")
    max_replicas: int = option(
        1, "upper bound of replicas; above min_replicas, Serve autoscales between them"
    )
    target_ongoing_requests: float = option(
        8.0, "autoscaling target of requests in flight per replica (queued for a batch or running)"
    )
    max_ongoing_requests: int = option(
        64, "requests one replica accepts at once; at least max_batch_size, or batches never fill"
    )

    def __post_init__(self) -> None:
        _at_least(self, 0, "num_cpus", "num_gpus")
        _at_least(self, 1, "min_replicas", "max_ongoing_requests")
        if self.max_replicas < self.min_replicas:
            raise ConfigError(
                f"max_replicas ({self.max_replicas}) must be >= min_replicas ({self.min_replicas})"
            )
        if self.target_ongoing_requests <= 0:
            raise ConfigError(f"target_ongoing_requests must be > 0, got {self.target_ongoing_requests}")


@dataclass
class RouterResources(ServeResources):
    """The HTTP ingress: light on CPU, many requests in flight (class defaults, as nested configs are rebuilt)."""

    num_cpus: float = option(0.1, "CPUs reserved per replica")
    max_ongoing_requests: int = option(256, "requests one replica accepts at once")


@dataclass
class ServeConfig:
    """The Serve application: which checkpoint, index and teacher, batching, request limits and resources."""

    checkpoint: str | None = option(
        None, "student checkpoint folder (jobs/distill.py's out_dir/checkpoint); None: the demo, built once"
    )
    index: str | None = option(
        None, "index folder from jobs/index.py; None: the demo index without a checkpoint, else no /search"
    )
    teacher: str | None = option(
        None, "the Reranker's model: a model spec or a teacher YAML; None: the checkpoint's model and prompt"
    )
    demo_distill: list[str] = option(
        [], "key=value overrides of the demo distillation (DistillConfig) run when no checkpoint is given"
    )
    device: str | None = option(None, "torch device of the models; None: CUDA when the replica has a GPU")
    max_batch_size: int = option(16, "requests per model call (dynamic batching; 1 turns it off)")
    batch_wait_timeout_s: float = option(0.01, "longest wait for a batch to fill once a request is queued")
    max_documents: int = option(100, "documents per /rerank request and inputs per /v1/embeddings request")
    max_text_bytes: int = option(32768, "UTF-8 bytes of one query, document or input (longer: 413)")
    max_request_bytes: int = option(4 * 2**20, "bytes of one request body (larger: 413)")
    max_top_k: int = option(100, "largest top_k of /search")
    first_stage_k: int = option(
        100, "FAISS candidates the predictor rescores per /search query (large indexes)"
    )
    encoder: ServeResources = option(ServeResources(), "the Encoder deployment (student and index)")
    reranker: ServeResources = option(ServeResources(), "the Reranker deployment (teacher)")
    router: RouterResources = option(RouterResources(), "the Router deployment (HTTP ingress)")

    def __post_init__(self) -> None:
        _at_least(self, 1, "max_batch_size", "max_documents", "max_text_bytes", "max_request_bytes")
        _at_least(self, 1, "max_top_k", "first_stage_k")
        _at_least(self, 0, "batch_wait_timeout_s")


# --------------------------------------------------------------------------------------------------------------
# README.md's configuration reference, generated from the dataclasses above; tests/test_config.py checks it.

README = Path(__file__).resolve().parents[1] / "README.md"
REFERENCE_START = "<!-- config-reference:start -->"
REFERENCE_END = "<!-- config-reference:end -->"
REGENERATE = "python -m rabtriever_ray.config --write-readme"

# The top-level configs (nested ones are expanded under them), each with who reads it and how to override it.
REFERENCE_CONFIGS: tuple[tuple[type, str], ...] = (
    (
        TeacherConfig,
        "Read by `jobs/score_teacher.py` and `jobs/evaluate.py` from `--config configs/teacher/*.yaml`, then "
        "trailing `key=value` overrides (`prompt.max_doc_tokens=256`); `jobs/index.py --config` and the "
        "ServeConfig key `teacher` take the YAML alone.",
    ),
    (
        DistillConfig,
        "Read by `jobs/distill.py` from `--config configs/*.yaml`, then trailing `key=value` overrides "
        "(`loss.w_jepa=0.5 student.proj_dim=128`); the ServeConfig key `demo_distill` takes the same overrides.",
    ),
    (
        TeacherTrainConfig,
        "Read by `jobs/train_teacher.py` from `--config configs/teacher_train/*.yaml`, then trailing "
        "`key=value` overrides (`lora=true epochs=2`); flags such as `--lora` and `--data` set the key of "
        "the same name.",
    ),
    (
        ServeConfig,
        "The args of `rabtriever_ray.serve:build_app`: `key=value` after `serve run "
        "rabtriever_ray.serve:build_app` (`encoder.num_gpus=0.5`), or the `args` mapping of "
        "`cluster/serve.yaml` (sections nested).",
    ),
)


def config_reference_markdown() -> str:
    """The README's configuration reference: per top-level config a ``####`` heading, who reads it and a table
    ``| key | type | default | meaning |`` with a row per dotted key (a section's row comes before its keys)."""
    sections = []
    for cls, usage in REFERENCE_CONFIGS:
        rows = []
        for key, f, field_type in _flat_fields(cls):
            if dataclasses.is_dataclass(field_type):
                type_cell, default_cell = f"`{field_type.__name__}`", f"`{key}.*` below"
            else:
                type_cell, default_cell = _markdown_type(field_type), _markdown_default(_default(f))
            help_cell = f.metadata["help"].replace("|", r"\|").replace("<", r"\<")  # \< : not an HTML tag
            rows.append(f"| `{key}` | {type_cell} | {default_cell} | {help_cell} |")
        header = [
            f"#### {cls.__name__}",
            "",
            usage,
            "",
            "| key | type | default | meaning |",
            "|---|---|---|---|",
        ]
        sections.append("\n".join(header + rows))
    return "\n\n".join(sections)


def _markdown_type(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return r" \| ".join(f"`{a}`" for a in typing.get_args(tp))
    return f"`{_type_name(tp)}`".replace("|", r"\|")


def _markdown_default(value: Any) -> str:
    """A default as YAML and the command line take it: numbers and booleans bare, the rest as code."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        text = "[" + ", ".join(map(str, value)) + "]"
    else:
        text = str(value) or '""'  # None stays None: both YAML (as null) and overrides take it
    return f"`{text}`".replace("|", r"\|")


def _split_readme(text: str, readme: Path) -> tuple[str, str, str]:
    """(the text up to and with the start marker, the block between the markers, the end marker and after)."""
    if (
        text.count(REFERENCE_START) != 1
        or text.count(REFERENCE_END) != 1
        or text.find(REFERENCE_END) < text.find(REFERENCE_START)
    ):
        raise ConfigError(f"{readme}: expected one {REFERENCE_START} line, then one {REFERENCE_END} line")
    head, rest = text.split(REFERENCE_START)
    block, tail = rest.split(REFERENCE_END)
    return head + REFERENCE_START, block, REFERENCE_END + tail


def readme_config_reference(readme: str | Path = README) -> str:
    """The block between the README's config-reference markers, without the blank lines around it."""
    readme = Path(readme)
    return _split_readme(readme.read_text(encoding="utf-8"), readme)[1].strip("\n")


def write_config_reference(readme: str | Path = README) -> bool:
    """Regenerate the block between the README's markers, keeping the rest of the file as it is; returns whether
    the file changed. Written to a temporary file beside it, then renamed over it."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    head, _, tail = _split_readme(text, readme)
    new = f"{head}\n\n{config_reference_markdown()}\n\n{tail}"
    if new == text:
        return False
    from .io import write_text_atomic

    write_text_atomic(readme, new, keep_mode=True)
    return True


def main(argv: list[str] | None = None) -> None:
    """Print the configuration reference, write it into the README (``--write-readme``) or check it (``--check``,
    exit status 1 when stale)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m rabtriever_ray.config",
        description="The configuration reference (markdown tables) generated from the config dataclasses.",
    )
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--write-readme",
        action="store_true",
        help="replace the README's block between the config-reference markers",
    )
    action.add_argument(
        "--check", action="store_true", help="exit with status 1 when the README's block is stale"
    )
    parser.add_argument(
        "--readme", type=Path, default=README, help="the README to write or check (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    if args.check:
        if readme_config_reference(args.readme) != config_reference_markdown():
            parser.exit(1, f"{args.readme}: the configuration reference is stale; run {REGENERATE}\n")
        print(f"{args.readme}: the configuration reference is current")
    elif args.write_readme:
        changed = write_config_reference(args.readme)
        print(f"{args.readme}: the configuration reference {'updated' if changed else 'was already current'}")
    else:
        print(config_reference_markdown())


if __name__ == "__main__":
    from .io import run_job

    run_job(main)
