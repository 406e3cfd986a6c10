"""The teacher: a generative reranker that reads document and query together and answers yes or no.

``GenerativeReranker.score(queries, documents)`` runs one LLM pass per pair (quadratic in the pair's length) and
returns, per pair, the score at the answer position (the preset's rule, `scoring.YesNoHead`: ``logp_yes - logp_no``
by default), the two log-probabilities
(log-softmax over the full vocabulary), and the final-layer hidden state at the answer position *before* the
final norm: the contextual query embedding the student learns to predict. ``lm_head(final_norm(hidden))``
reproduces the teacher's logits.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections import OrderedDict, defaultdict
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

import torch

from .backbone import last_token_hidden, shared_prefix_last_hidden
from .config import PromptConfig, TeacherConfig, to_dict
from .families import prefix_sharing_blocker, text_config
from .models import load_causal_lm, prompt_mismatch
from .prompts import EncodedPrompts, PromptBuilder
from .scoring import YesNoHead

logger = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Pairs per `score` call of `GenerativeReranker.rerank`. A call holds the keys and values of every document it shares
# between pairs (tens of MB each at 512 tokens), so the call is bounded; 256 is the distillation's teacher_batch_size.
RERANK_CHUNK_PAIRS = 256


class PrefixCache(MutableMapping):
    """Keys and values of shared prompt prefixes by their token ids, at most ``max_bytes`` of tensors: the least
    recently read or written go first. A prefix that does not fit on its own is not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple[int, ...], torch.Tensor] = OrderedDict()

    def __getitem__(self, key: tuple[int, ...]) -> torch.Tensor:
        self._items.move_to_end(key)
        return self._items[key]

    def __setitem__(self, key: tuple[int, ...], value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if key in self._items:
            del self[key]
        if size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            del self[next(iter(self._items))]
        self._items[key] = value
        self.bytes += size

    def __delitem__(self, key: tuple[int, ...]) -> None:
        value = self._items.pop(key)
        self.bytes -= value.numel() * value.element_size()

    def __contains__(self, key: object) -> bool:  # without counting as a use
        return key in self._items

    def __iter__(self):
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class TeacherScores:
    """Per-pair teacher outputs, all on CPU; ``n`` pairs, hidden size ``d``."""

    score: torch.Tensor  # [n] float32, by the preset's score rule (logp_yes - logp_no by default)
    logp_yes: torch.Tensor  # [n] float32
    logp_no: torch.Tensor  # [n] float32
    hidden: torch.Tensor  # [n, d] float32, pre-final-norm hidden state at the answer position
    query_tokens: torch.Tensor  # [n] int32, query tokens kept after truncation
    doc_tokens: torch.Tensor  # [n] int32, document tokens kept after truncation
    query_truncated: torch.Tensor  # [n] bool, the query was cut
    doc_truncated: torch.Tensor  # [n] bool, the document was cut

    @property
    def truncated(self) -> torch.Tensor:
        """``[n]`` bool: the query or the document was cut."""
        return self.query_truncated | self.doc_truncated

    def select(self, rows: torch.Tensor) -> TeacherScores:
        """The outputs of pairs ``rows`` (a 1-D index tensor), in that order."""
        return TeacherScores(**{f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)})


class GenerativeReranker:
    """Scores (query, document) pairs with a causal LM's yes/no answer.

    Args:
        model, tokenizer: from `load_causal_lm`.
        prompt_config: the prompt template, answer words and truncation limits.
        max_batch_tokens: padded tokens per forward batch; pairs are sorted by length to keep padding low.
        share_prefix: run a prompt prefix shared by several pairs once and reuse its keys and values:
            everything up to the second slot for pairs with the same first slot (the document, or the query in a
            query-first preset), else the template alone. Exact on sliding-window models too; switched off, with
            a log line, for models whose cache is not plain keys and values (`families.prefix_sharing_blocker`).
            Prefixes are kept across calls in a `PrefixCache` of ``prefix_cache_mb`` MiB: those that depend on no
            text (the template before the first slot, and, document first, everything before the query in a
            student query prompt, whose document slot is empty), so a query costs only its own tokens and what
            follows them, and the documents' prefixes, so a document seen before costs its pairs only their own
            tokens. The backbone must stay frozen while this teacher is used.
        quantize: ``int8`` runs pair scores and student query encodings through an int8 copy of the decoder
            blocks (`precision.quantized_copy`, CPU only), calibrated and checked against fp32 on a sample of the
            bundled demo texts when the teacher is built: ``precision`` holds the figures, and disagreement beyond
            `precision.THRESHOLDS` is refused (``quantize_check="warn"``: logged). Document encoding stays fp32.
        prefix_cache_mb: the budget of each prefix cache (one per model copy: fp32, and int8 where built).

    ``stats`` accumulates ``tokens`` (real tokens run), ``padded_tokens`` and ``forwards`` over all calls.
    """

    def __init__(
        self,
        model,
        tokenizer,
        prompt_config: PromptConfig | None = None,
        max_batch_tokens: int = 8192,
        share_prefix: bool = True,
        quantize: str = "none",
        quantize_check: str = "refuse",
        prefix_cache_mb: int = 256,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = PromptBuilder(tokenizer, prompt_config)
        self.head = YesNoHead(model, self.prompts.yes_id, self.prompts.no_id, self.prompts.score_rule)
        self.max_batch_tokens = max_batch_tokens
        blocker = prefix_sharing_blocker(model) if share_prefix else None
        if blocker:
            logger.info("prefix sharing is off: %s", blocker)
        self.share_prefix = share_prefix and blocker is None
        self.stats: dict[str, int] = {}
        # Keys and values of shared prefixes kept between calls, by token ids (`PrefixCache`).
        self.prefix_cache = PrefixCache(prefix_cache_mb << 20)
        self.low_model = None  # the int8 copy of the decoder blocks, with its own prefix cache
        self.low_prefix_cache = PrefixCache(prefix_cache_mb << 20)
        self.precision: dict = {"scheme": "none"}
        if quantize != "none":
            self._quantize(quantize, quantize_check)

    @classmethod
    def from_config(
        cls, config: TeacherConfig, device: str | torch.device | None = None
    ) -> GenerativeReranker:
        warning = prompt_mismatch(config.model, to_dict(config.prompt))
        if warning:
            logger.warning(warning)
        model, tokenizer = load_causal_lm(config.model, device=device, dtype=_DTYPES.get(config.dtype))
        return cls(
            model,
            tokenizer,
            config.prompt,
            config.max_batch_tokens,
            config.share_prefix,
            config.quantize,
            config.quantize_check,
            config.prefix_cache_mb,
        )

    @property
    def hidden_size(self) -> int:
        return text_config(self.model.config).hidden_size

    def _quantize(self, scheme: str, check: str) -> None:
        """Build `low_model` from activation ranges on one demo sample, then measure its pair scores against
        fp32 on another (`precision`)."""
        from . import precision

        if scheme not in precision.SCHEMES:
            raise ValueError(f"quantize must be one of {precision.SCHEMES}, got {scheme!r}")
        reason = precision.int8_unavailable(next(self.model.parameters()).device)
        if reason:
            raise precision.PrecisionError(reason)
        calibration, sample = precision.calibration_samples()

        def calibrate() -> None:
            fp32_scores(*calibration)
            self.encode(self.prompts.query_prompts(calibration[0]))

        def fp32_scores(q, d):
            return precision.sample_scores(lambda a, b: self.score(a, b, low_precision=False).score, q, d)

        self.low_model = precision.quantized_copy(self.model, *precision.input_statistics(self.model, calibrate))
        figures = precision.agreement(
            fp32_scores(*sample), precision.sample_scores(lambda a, b: self.score(a, b).score, *sample)
        )
        self.precision = {"scheme": scheme, "cpu": precision.cpu_flags(), "teacher": figures}
        precision.enforce(figures, "teacher scores", check)

    def encode(
        self, prompts: EncodedPrompts, query_mean: bool = False, low_precision: bool = True
    ) -> torch.Tensor:
        """Pre-norm last-token hidden states ``[n, d]`` of built prompts (see `PromptBuilder`), through the int8
        blocks when the teacher has them and ``low_precision`` (document encodings pass False).

        With ``query_mean``, ``[n, 2d]``: each row is followed by the mean pre-norm state over the prompt's query
        tokens, from the same forward (`backbone.span_mean`).
        """
        low = low_precision and self.low_model is not None
        model = self.low_model if low else self.model
        ids = prompts.input_ids
        spans = None
        if query_mean:
            spans = [(s, s + n) for s, n in zip(prompts.query_start, prompts.query_tokens, strict=True)]
        if not (self.share_prefix and any(prompts.template_tokens)):
            return last_token_hidden(
                model,
                ids,
                pad_id=self.tokenizer.pad_token_id,
                padding_side=self.tokenizer.padding_side,
                max_batch_tokens=self.max_batch_tokens,
                stats=self.stats,
                spans=spans,
            )
        # Pairs that share the slot that comes first (a document, or a query in a query-first format) share
        # everything up to the second slot; the rest share the template before the first slot. A prompt whose
        # first slot is empty (a student query prompt, document first) shares everything before its query.
        # Prefixes are keyed by their token ids, so only identical leading tokens are ever shared; with
        # ``query_mean`` a prefix stops before the query, whose tokens are averaged from the tail. Every prefix run
        # here goes into the cache (`PrefixCache`), so a document seen by an earlier call is not run again.
        cache = self.low_prefix_cache if low else self.prefix_cache
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for index, shared in enumerate(prompts.shared_tokens):
            groups[tuple(ids[index][:shared])].append(index)
        prefix_index: dict[tuple[int, ...], int] = {}
        prefix_of = [0] * len(ids)
        for head, members in groups.items():
            for index in members:
                shareable = spans is None or len(head) <= prompts.query_start[index]
                if prompts.first_slot_tokens[index] == 0 or (
                    shareable and (len(members) >= 2 or head in cache)
                ):
                    key = head  # depends on no text, or template + a first slot shared or seen before
                else:
                    key = tuple(ids[index][: max(prompts.template_tokens[index], 1)])  # the template alone
                prefix_of[index] = prefix_index.setdefault(key, len(prefix_index))
        prefixes = list(prefix_index)
        return shared_prefix_last_hidden(
            model,
            prefixes,
            [ids[i][len(prefixes[prefix_of[i]]) :] for i in range(len(ids))],
            prefix_of,
            pad_id=self.tokenizer.pad_token_id,
            max_batch_tokens=self.max_batch_tokens,
            stats=self.stats,
            kv_cache=cache,
            keep=[True] * len(prefixes),
            spans=spans,
        )

    def score(
        self,
        queries: Sequence[str],
        documents: Sequence[str],
        head_chunk: int = 256,
        low_precision: bool = True,
    ) -> TeacherScores:
        """Score aligned ``queries[i]`` / ``documents[i]`` pairs (see `TeacherScores`); int8 when the teacher
        is quantised, unless ``low_precision`` is False."""
        prompts = self.prompts.pair_prompts(queries, documents)
        hidden = self.encode(prompts, low_precision=low_precision)
        answers = torch.empty(
            (3, len(hidden)), dtype=torch.float32
        )  # ordinary tensor, filled in inference mode
        with torch.inference_mode():
            for start in range(0, len(hidden), head_chunk):
                chunk = self.head.log_probs(hidden[start : start + head_chunk])
                answers[:, start : start + head_chunk] = torch.stack(chunk).cpu()
        score, logp_yes, logp_no = answers
        return TeacherScores(
            score=score,
            logp_yes=logp_yes,
            logp_no=logp_no,
            hidden=hidden,
            query_tokens=torch.tensor(prompts.query_tokens, dtype=torch.int32),
            doc_tokens=torch.tensor(prompts.doc_tokens, dtype=torch.int32),
            query_truncated=torch.tensor(prompts.query_truncated, dtype=torch.bool),
            doc_truncated=torch.tensor(prompts.doc_truncated, dtype=torch.bool),
        )

    def rerank(
        self, queries: Sequence[str], candidates: Sequence[Sequence[str]], details: bool = False
    ) -> list[torch.Tensor] | list[TeacherScores]:
        """Each query's own candidate documents: ``queries[i]`` with each text of ``candidates[i]`` -> ``n`` CPU
        float32 tensors ``[len(candidates[i])]`` of scores, in order; with ``details``, each query's
        `TeacherScores` instead (the prompts are tokenised once for both).

        The pairs of every query go through `score` in calls of at most `RERANK_CHUNK_PAIRS` pairs, grouped by the
        slot the prompt puts first (document-major for a document-first preset, query-major for a query-first
        one), a group's pairs kept in one call when they fit: they batch together and share that slot's prefix
        as in one call over every pair, while a call's cache of shared prefixes stays bounded.
        `Rabtriever.rerank` is the student's.
        """
        first = (lambda row, doc: queries[row]) if self.prompts.query_first else (lambda row, doc: doc)
        pairs = sorted(
            (first(row, doc), row, column, doc)
            for row, docs in enumerate(candidates)
            for column, doc in enumerate(docs)
        )
        chunks, chunk = [], []
        for _, group in itertools.groupby(pairs, key=lambda pair: pair[0]):
            group = list(group)
            if chunk and len(chunk) + len(group) > RERANK_CHUNK_PAIRS and len(group) <= RERANK_CHUNK_PAIRS:
                chunks.append(chunk)  # the group starts the next call
                chunk = []
            for pair in group:  # a larger group fills calls up
                chunk.append(pair)
                if len(chunk) == RERANK_CHUNK_PAIRS:
                    chunks.append(chunk)
                    chunk = []
        if chunk:
            chunks.append(chunk)
        outputs = [
            self.score([queries[row] for _, row, _, _ in chunk], [doc for _, _, _, doc in chunk])
            for chunk in chunks
        ] or [self.score([], [])]
        merged = TeacherScores(
            **{f.name: torch.cat([getattr(o, f.name) for o in outputs]) for f in dataclasses.fields(TeacherScores)}
        )
        position = {(row, column): i for i, (_, row, column, _) in enumerate(pair for c in chunks for pair in c)}
        rows = [
            torch.tensor([position[(row, column)] for column in range(len(docs))], dtype=torch.long)
            for row, docs in enumerate(candidates)
        ]
        return [merged.select(index) if details else merged.score[index] for index in rows]
