"""The student: Rabtriever encodes queries and documents independently with the teacher's frozen LLM.

Documents are encoded once (hidden state at their last token); a query is encoded once with the teacher's
template and an empty document slot. The trainable `Predictor` maps the query embedding, conditioned on a
document embedding, onto the teacher's contextual query embedding, and the frozen LM head reads the yes/no
score from it through the same `YesNoHead` as the teacher. Per query the cost no longer grows with document
length.

First-stage projections ``q_proj`` / ``d_proj`` (d -> k, L2-normalised) put queries and documents in one
inner-product space, so a FAISS index can shortlist candidates before the predictor scores them.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import StudentConfig, TeacherConfig, to_dict
from .predictor import Predictor
from .prompts import EncodedPrompts
from .teacher import GenerativeReranker

logger = logging.getLogger(__name__)


class Rabtriever(nn.Module):
    """Frozen backbone and LM head (shared with the teacher) plus trainable predictor and projections.

    Only the predictor and the projections are registered as submodules: ``state_dict()`` and ``parameters()``
    hold exactly what trains and what a checkpoint stores, never the frozen LLM.
    """

    def __init__(self, teacher: GenerativeReranker, config: StudentConfig | None = None):
        super().__init__()
        config = config or StudentConfig()
        self.config = config
        teacher.model.requires_grad_(False)
        # Plain attribute, not a submodule: shared with the teacher and excluded from state_dict / DDP.
        self.__dict__["teacher"] = teacher
        self.precision: dict = dict(teacher.precision)  # `check_precision` adds the student's figures
        hidden_size = teacher.hidden_size
        generator = torch.Generator().manual_seed(config.seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.predictor = Predictor(
                hidden_size, config.predictor_hidden, config.input_norm, config.query_mean, config.dropout
            )
            self.q_proj = nn.Linear(self.query_width, config.proj_dim, bias=False)
            self.d_proj = nn.Linear(hidden_size, config.proj_dim, bias=False)
        # Log of the factor that turns first-stage cosines into logits for the listwise loss (ranking by
        # inner product, as a FAISS index does, does not depend on it). Shape [1], not a 0-d scalar: DeepSpeed
        # broadcasts parameters as byte views, which 0-d tensors cannot take.
        self.first_stage_scale = nn.Parameter(torch.tensor([math.log(10.0)]))
        # Both projections start as the same random orthogonal map, so untrained first-stage scores are a
        # cosine similarity of the frozen last-token embeddings rather than noise (the query tokens' mean, with
        # `query_mean`, starts with zero weight).
        init = torch.empty(config.proj_dim, hidden_size)
        nn.init.orthogonal_(init, generator=generator)
        with torch.no_grad():
            self.q_proj.weight.zero_()
            self.q_proj.weight[:, :hidden_size].copy_(init)
            self.d_proj.weight.copy_(init)
        self.to(next(teacher.model.parameters()).device)

    @property
    def head(self):
        return self.teacher.head

    @property
    def hidden_size(self) -> int:
        return self.teacher.hidden_size

    @property
    def query_width(self) -> int:
        """Width of a query embedding: ``d``, or ``2d`` with `StudentConfig.query_mean`."""
        return self.hidden_size * (2 if self.config.query_mean else 1)

    # -- encoding (frozen) --------------------------------------------------------------------------------------

    def encode_queries(self, texts: Sequence[str] | EncodedPrompts) -> torch.Tensor:
        """``[n, d]`` float32: pre-norm hidden state at the answer position of the empty-document prompt; with
        `StudentConfig.query_mean`, ``[n, 2d]``: that state, then the mean pre-norm state over the query's tokens
        (same forward). ``texts`` may be their `PromptBuilder.query_prompts`, built once by a caller that also
        reads the truncation bookkeeping."""
        prompts = texts if isinstance(texts, EncodedPrompts) else self.teacher.prompts.query_prompts(texts)
        return self.teacher.encode(prompts, query_mean=self.config.query_mean)

    def encode_documents(self, texts: Sequence[str] | EncodedPrompts) -> torch.Tensor:
        """``[m, d]`` float32: pre-norm hidden state at the last token of the document alone (``texts`` may be
        their `PromptBuilder.document_prompts`)."""
        prompts = texts if isinstance(texts, EncodedPrompts) else self.teacher.prompts.document_prompts(texts)
        return self.teacher.encode(prompts, low_precision=False)

    def check_precision(self, check: str = "refuse") -> dict:
        """With an int8 teacher: this student's scores from int8 query encodings against fp32 ones, on a demo
        sample (`precision.agreement`), kept in ``precision["student"]`` and enforced (see `precision.enforce`)."""
        from . import precision

        if self.teacher.low_model is None:
            return {}
        _, (queries, documents) = precision.calibration_samples()  # the teacher's agreement sample
        prompts = self.teacher.prompts.query_prompts(queries)
        with torch.inference_mode():
            h_doc = self.encode_documents(documents)
            fp32, low = (
                self.score_matrix(
                    self.teacher.encode(prompts, self.config.query_mean, low_precision=low), h_doc
                )
                for low in (False, True)
            )
        figures = precision.agreement(fp32, low)
        self.precision = {**self.teacher.precision, "student": figures}
        precision.enforce(figures, "student scores", check)
        return figures

    # -- scoring (trainable) ------------------------------------------------------------------------------------

    def _device(self) -> torch.device:
        return self.q_proj.weight.device

    def predict(self, h_query: torch.Tensor, h_doc: torch.Tensor) -> torch.Tensor:
        """Predicted contextual query embedding ``[..., d]`` for broadcastable ``[..., d]`` inputs (in the
        predictor's dtype: an index may hold its document states in float16)."""
        weight = self.q_proj.weight
        return self.predictor(h_query.to(weight.device, weight.dtype), h_doc.to(weight.device, weight.dtype))

    def score(self, h_query: torch.Tensor, h_doc: torch.Tensor) -> torch.Tensor:
        """Aligned pairs ``[n, d]`` x ``[n, d]`` -> ``[n]`` float32 scores ``logp_yes - logp_no``."""
        return self.head.score(self.predict(h_query, h_doc))

    def _pair_bytes(self) -> int:
        """Bytes of the predictor's input and activations for one (query, document) pair (float32)."""
        return (
            self.query_width + 3 * self.hidden_size + self.config.predictor_hidden + 2 * self.hidden_size
        ) * 4

    def score_matrix(
        self, h_query: torch.Tensor, h_doc: torch.Tensor, max_chunk_bytes: int = 256 * 2**20
    ) -> torch.Tensor:
        """Every query against every document: ``[n, d]`` x ``[m, d]`` -> ``[n, m]`` float32 scores.

        Query rows are processed in chunks so the predictor's ``[rows, m, 3d]`` input and hidden activations
        stay within ``max_chunk_bytes``.
        """
        n, m = h_query.shape[0], h_doc.shape[0]
        rows = max(1, max_chunk_bytes // max(m * self._pair_bytes(), 1))
        h_doc = h_doc.to(self._device())
        out = [
            self.score(h_query[i : i + rows, None, :], h_doc[None, :, :]).float() for i in range(0, n, rows)
        ]
        return torch.cat(out) if out else torch.empty((0, m))

    def rerank(
        self,
        h_query: torch.Tensor,
        h_doc: torch.Tensor,
        candidates: Sequence[Sequence[int]],
        max_chunk_bytes: int = 256 * 2**20,
    ) -> list[torch.Tensor]:
        """Each query's own candidates: query ``i`` (row of ``h_query`` ``[n, d]``) against the rows
        ``candidates[i]`` of ``h_doc`` ``[m, d]`` -> ``n`` CPU float32 tensors ``[len(candidates[i])]``, in order.

        The teacher's `GenerativeReranker.rerank` for the student: every pair of every query runs through aligned
        `score` calls of at most ``max_chunk_bytes`` (see `score_matrix`), then is regrouped by query.
        """
        query_rows = torch.tensor([i for i, rows in enumerate(candidates) for _ in rows], dtype=torch.long)
        doc_rows = torch.tensor([j for rows in candidates for j in rows], dtype=torch.long)
        chunk = max(1, max_chunk_bytes // self._pair_bytes())
        scores = [
            self.score(h_query[query_rows[s : s + chunk]], h_doc[doc_rows[s : s + chunk]]).float().cpu()
            for s in range(0, len(doc_rows), chunk)
        ]
        flat = torch.cat(scores) if scores else torch.empty(0)
        return list(flat.split([len(rows) for rows in candidates]))

    def forward(self, h_query: torch.Tensor, h_doc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training forward for aligned pairs ``[n, d]``: (predicted embedding ``[n, d]``, first-stage logits ``[n]``).

        Everything trainable is used here, so DDP (which wraps this module) syncs all of it. In training mode the
        predictor's query statistics learn from ``h_query`` first (`Predictor.observe`).
        """
        if self.training:
            self.predictor.observe(h_query.to(self._device()))
        first_stage = (self.embed_queries(h_query) * self.embed_documents(h_doc)).sum(
            -1
        ) * self.first_stage_scale.exp()
        return self.predict(h_query, h_doc), first_stage

    def embed_queries(self, h_query: torch.Tensor) -> torch.Tensor:
        """First-stage query vectors ``[n, k]``, L2-normalised."""
        # With `query_mean` the projection reads [last; mean] as they are: standardising the mean by the
        # predictor's running statistics made the first stage chase those statistics while they settled.
        return F.normalize(self.q_proj(h_query.to(self._device())), dim=-1)

    def embed_documents(self, h_doc: torch.Tensor) -> torch.Tensor:
        """First-stage document vectors ``[m, k]``, L2-normalised (what a FAISS inner-product index holds)."""
        return F.normalize(self.d_proj(h_doc.to(self._device())), dim=-1)

    # -- checkpoints --------------------------------------------------------------------------------------------

    def save_trainable(self, path: str | Path, **metadata) -> None:
        """Write the trainable parts to ``path/student.safetensors`` and their config to ``path/student.json``.

        Never the frozen backbone: a checkpoint is loaded onto the teacher model it was trained with.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().cpu().contiguous() for name, tensor in self.state_dict().items()}
        save_file(state, str(path / "student.safetensors"))
        info = {"student": to_dict(self.config), "hidden_size": self.hidden_size, **metadata}
        (path / "student.json").write_text(json.dumps(info, indent=2) + "\n")

    def load_trainable(self, path: str | Path) -> dict:
        """Load `save_trainable` output (safetensors only); returns its metadata. Shape mismatches are errors."""
        from safetensors.torch import load_file

        path = Path(path)
        info = json.loads((path / "student.json").read_text())
        if info["hidden_size"] != self.hidden_size:
            raise ValueError(
                f"{path}: checkpoint hidden size {info['hidden_size']} != model hidden size {self.hidden_size}"
            )
        try:
            self.load_state_dict(load_file(str(path / "student.safetensors"), device=str(self._device())))
        except RuntimeError as err:  # missing, unexpected or mis-shaped tensors
            raise ValueError(
                f"{path / 'student.safetensors'} does not fit this student (another student config or an older "
                f"checkpoint format): {err}"
            ) from err
        return info


def checkpoint_digest(path: str | Path) -> str:
    """SHA-256 of a checkpoint's ``student.safetensors`` (what an index built with it records)."""
    import hashlib

    digest = hashlib.sha256()
    with open(Path(path) / "student.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_student_info(checkpoint: str | Path, teacher: TeacherConfig | None = None) -> dict:
    """A checkpoint's ``student.json``, checked, with ``teacher_config`` (`TeacherConfig`) and ``student_config``.

    The backbone and prompt are the ones the checkpoint was trained with unless ``teacher`` is given. A
    checkpoint that records no prompt needs ``teacher``: it would otherwise be read with the default prompt.
    """
    from .config import ConfigError, from_dict, recorded_prompt

    path = Path(checkpoint)
    info_path = path / "student.json"
    if not info_path.is_file() or not (path / "student.safetensors").is_file():
        raise FileNotFoundError(
            f"{path}: not a Rabtriever checkpoint (needs student.json and student.safetensors)"
        )
    info = json.loads(info_path.read_text())
    if "prompt" in info and "answer_prefix" not in info["prompt"]:
        # Checkpoints of that format were trained on prompts tokenised segment by segment.
        logger.warning(
            "%s was trained on prompts tokenised segment by segment; prompts are now tokenised whole, which "
            "changes the tokens of some (every empty-document query prompt, for byte-level BPE tokenizers): "
            "its scores may drift from its teacher's; distil it again for exact agreement",
            info_path,
        )
    if teacher is None:
        if "prompt" not in info or "teacher" not in info:
            raise ConfigError(
                f"{info_path}: records no teacher/prompt; pass the teacher config it was trained with"
            )
        # The record keeps the teacher's keys loose (teacher = its model spec), as checkpoints always have.
        recorded = {"model": info["teacher"], "prompt": recorded_prompt(info["prompt"])}
        if "max_batch_tokens" in info:
            recorded["max_batch_tokens"] = info["max_batch_tokens"]
        teacher = from_dict(TeacherConfig, recorded, source=f"{info_path} teacher")
    info["teacher_config"] = teacher
    # Checkpoints written before query embeddings could carry the query tokens' mean were trained without it.
    recorded_student = {"query_mean": False, **info["student"]}
    info["student_config"] = from_dict(StudentConfig, recorded_student, source=f"{info_path} student")
    return info


def load_student(
    checkpoint: str | Path | Any,
    teacher: TeacherConfig | None = None,
    device: str | torch.device | None = None,
) -> Rabtriever:
    """A trained Rabtriever from a checkpoint folder or a `ray.train.Checkpoint` (see `load_student_info`), in
    eval mode."""
    # A Ray Train checkpoint (on the run's storage) is fetched to a folder on this node while loading.
    if not isinstance(checkpoint, (str, Path)):
        with checkpoint.as_directory() as directory:
            return load_student(directory, teacher, device)
    info = load_student_info(checkpoint, teacher)
    student = Rabtriever(
        GenerativeReranker.from_config(info["teacher_config"], device=device), info["student_config"]
    )
    student.load_trainable(checkpoint)
    student.eval()
    student.check_precision(info["teacher_config"].quantize_check)
    return student
