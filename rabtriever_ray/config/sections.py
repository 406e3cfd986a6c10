"""The model sections every job nests: the prompt, the teacher, the student and the losses.

A default and a help string per field; how they are loaded from YAML and ``key=value`` overrides is
`rabtriever_ray.config.loading`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from ..presets import PRESET_NAMES, PRESETS
from .base import ConfigError, check_at_least, option

# PromptConfig keys that shape the rabtriever preset's template (the other presets fix theirs).
_TEMPLATE_KEYS = (
    "answer_hint",
    "instruction_first",
    "system",
    "doc_label",
    "query_label",
    "answer_yes",
    "answer_no",
    "enable_thinking",
    "answer_prefix",
)


@dataclass
class PromptConfig:
    """How (query, document) pairs are rendered for the teacher and the student."""

    preset: Literal[PRESET_NAMES] = option(  # type: ignore[valid-type]
        "rabtriever",
        "the reranker's prompt format (template, query/document order, score rule; see docs/models.md): "
        "rabtriever, qwen3-reranker, bge-reranker-gemma or mxbai-rerank-v2",
    )
    instruction: str | None = option(
        None,
        "the task instruction (rabtriever: the question after document and query; qwen3-reranker: <Instruct>; "
        "bge-reranker-gemma: the closing prompt; mxbai-rerank-v2: an optional 'instruction:' line); "
        "None: the preset's default",
    )
    answer_hint: str = option("Answer yes or no.", "appended to the instruction")
    instruction_first: bool = option(
        True,
        "rabtriever: the instruction opens the message, before the document (false: it closes the message, "
        "after the query); first, it joins the prefix the pairs of a document share, so a pair runs only its "
        "query and the answer prompt",
    )
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
        check_at_least(self, 1, "max_doc_tokens", "max_query_tokens")
        if self.preset not in PRESETS:
            raise ConfigError(f"prompt.preset must be one of {', '.join(PRESET_NAMES)}, got {self.preset!r}")
        if self.preset != "rabtriever":
            # A published reranker's template is fixed; only the instruction and the truncation are its user's.
            default = PromptConfig()
            changed = [key for key in _TEMPLATE_KEYS if getattr(self, key) != getattr(default, key)]
            if changed:
                raise ConfigError(
                    f"prompt.{changed[0]} shapes the rabtriever template only; the {self.preset} preset renders "
                    "the template its model was trained with (set prompt.instruction, prompt.max_doc_tokens or "
                    "prompt.max_query_tokens, or use preset rabtriever)"
                )
            return
        if not self.answer_yes.strip() or not self.answer_no.strip() or self.answer_yes == self.answer_no:
            raise ConfigError(
                f"answer_yes/answer_no must be distinct and non-empty, got {self.answer_yes!r}/{self.answer_no!r}"
            )

    @property
    def task_instruction(self) -> str | None:
        """``instruction``, or the preset's default where it is None."""
        return self.instruction if self.instruction is not None else PRESETS[self.preset].instruction


# Prompt fields added with a default other than the behaviour before them: the value records without them used.
_BEFORE_FIELD = {"instruction_first": False}


def recorded_prompt(record: Mapping[str, Any]) -> dict[str, Any]:
    """A prompt as a record (a checkpoint, a teacher, pre-scored data) wrote it, with the fields it predates set
    to what its prompts were rendered with then (`_BEFORE_FIELD`; they shape the rabtriever template only, and
    keep their defaults in the other presets)."""
    if record.get("preset", "rabtriever") != "rabtriever":
        return dict(record)
    return {**_BEFORE_FIELD, **record}


def prompt_differences(recorded: Mapping[str, Any], prompt: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, recorded value, value in prompt)`` for each field of ``prompt`` (a `PromptConfig` as a dict, or
    part of one) that differs from ``recorded``, sorted by key.

    A field the record lacks (written before the field existed) counts as what that record's prompts were
    rendered with (`recorded_prompt`, else the default); an instruction of None counts as its preset's default.
    """
    defaults = dataclasses.asdict(PromptConfig())
    recorded = recorded_prompt(recorded)

    def value(source: Mapping[str, Any], key: str) -> Any:
        found = source.get(key, defaults.get(key))
        if key == "instruction" and found is None:  # the preset's default, written out or not
            found = PRESETS[source.get("preset", defaults["preset"])].instruction
        return found

    return [
        (key, value(recorded, key), value(prompt, key))
        for key in sorted(prompt)
        if value(recorded, key) != value(prompt, key)
    ]


@dataclass
class TeacherConfig:
    """The generative reranker: which model, how it is prompted and batched.

    Where a config nests one (``teacher``), a plain string stands for the section: a model spec sets ``model``
    (``teacher=runs/my_teacher``), a path ending in ``.yaml`` loads the section from that file.
    """

    SHORTHAND: ClassVar[str] = "model"

    model: str = option(
        "smollm2-135m", "model spec: smollm2-135m, tiny-random-llama, a HF id, a directory or a .gguf file"
    )
    prompt: PromptConfig = option(PromptConfig(), "prompt template and truncation")
    max_batch_tokens: int = option(8192, "padded tokens per forward batch (rows x longest sequence)")
    share_prefix: bool = option(True, "run a prompt prefix shared by several pairs (same document) once")
    prefix_cache_mb: int = option(
        256,
        "MiB of shared prefixes' keys and values (template + document) kept between calls, least recently used "
        "out first, so a document that comes back (a small corpus, a candidate of many queries) runs only its "
        "pairs' own tokens; on the model's device; 0: shared within a call only",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "auto: bf16 on GPU, fp32 on CPU"
    )
    quantize: Literal["none", "int8"] = option(
        "none",
        "int8: pair scores and student query encodings run int8 decoder blocks on CPU (LM head, scores and "
        "document encodings stay fp32), checked against fp32 on a calibration sample when loaded; training "
        "always runs the backbone as dtype says",
    )
    quantize_check: Literal["refuse", "warn"] = option(
        "refuse", "what an int8 model whose scores disagree with fp32 on the calibration sample does"
    )

    def __post_init__(self) -> None:
        check_at_least(self, 1, "max_batch_tokens")
        check_at_least(self, 0, "prefix_cache_mb")

    def at_precision_of(self, other: Any) -> TeacherConfig:
        """This teacher at the precision ``other`` (a teacher or Serve config) asks for."""
        return dataclasses.replace(self, quantize=other.quantize, quantize_check=other.quantize_check)


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
    dropout: float = option(0.0, "dropout on the predictor MLP's hidden layer while training")
    proj_dim: int = option(256, "dimension of the first-stage projections q_proj / d_proj")
    seed: int = option(0, "seed for the trainable parts' initialisation")

    def __post_init__(self) -> None:
        check_at_least(self, 1, "predictor_hidden", "proj_dim")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"student.dropout must be in [0, 1), got {self.dropout}")


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
        check_at_least(self, 0, "w_jepa", "w_rkl", "w_list", "w_rank")
