"""The Ray Data teacher stage: candidate pairs stream through teacher actors that emit scores and embeddings.

`teacher_stage(pairs, teacher)` is lazy: a ``map_batches`` over an actor pool (``ActorPoolStrategy``), each actor
loading the teacher once and tokenising inside. It runs on GPUs when the cluster has them (``num_gpus`` per
actor) and on CPUs otherwise. Actors that die are restarted and their batches retried, so every pair comes out
exactly once. The distillation job consumes this Dataset directly; ``jobs/score_teacher.py`` writes it
(`teacher_scores`).

Output schema (one row per (query, document) pair; `check_schema` enforces it when reading):

==============  ==========================  ====================================================================
column          dtype                       meaning
==============  ==========================  ====================================================================
query_id        string                      query ``_id``
doc_id          string                      document ``_id``
label           int8                        qrel grade; 0 judged query but unjudged document; -1 unknown
query_text      string                      the query as given to the teacher (before truncation)
doc_text        string                      the document as read (title, newline, text; before truncation)
teacher_score   float32                     the preset's score at the answer position (`scoring.YesNoHead`;
                                            ``logp_yes - logp_no`` by default; higher = relevant)
logp_yes        float32                     log-probability of the "yes" token (log-softmax, full vocabulary)
logp_no         float32                     log-probability of the "no" token
teacher_hidden  fixed_size_list<float32>[d] final-layer hidden state at the answer position *before* the
                                            final norm: ``lm_head(final_norm(h))`` gives the teacher's logits
query_tokens    int32                       query tokens the teacher read (after truncation)
doc_tokens      int32                       document tokens the teacher read (after truncation)
truncated       bool                        the query or the document was cut
==============  ==========================  ====================================================================

The two text columns go beyond the scores so that training can encode exactly the texts the teacher read
without a join against the corpus.

With ``outputs_dir`` (the distillation passes a folder beside its Ray Train run), every scored batch is also
written there, named by a hash of its pairs and texts, and a batch found there is read back instead of scored:
a training worker restarted after a failure reads the stream again, and the teacher work done before the failure
is not done twice. `runs.persisted_counts` says how many pairs were scored and how many read back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa

from .config import TeacherConfig
from .data import PAIR_SCHEMA
from .io import write_text_atomic
from .presets import PRESETS

SCORE_COLUMNS = [
    "teacher_score",
    "logp_yes",
    "logp_no",
    "teacher_hidden",
    "query_tokens",
    "doc_tokens",
    "truncated",
]


class SchemaError(ValueError):
    """Teacher scores whose columns, dtypes or hidden size are not what this stage writes."""


def output_schema(hidden_size: int) -> pa.Schema:
    return pa.schema(
        list(PAIR_SCHEMA)
        + [
            ("teacher_score", pa.float32()),
            ("logp_yes", pa.float32()),
            ("logp_no", pa.float32()),
            ("teacher_hidden", pa.list_(pa.float32(), hidden_size)),
            ("query_tokens", pa.int32()),
            ("doc_tokens", pa.int32()),
            ("truncated", pa.bool_()),
        ]
    )


def check_schema(schema: pa.Schema, hidden_size: int | None = None, source: str = "teacher scores") -> int:
    """Check a schema against `output_schema`; returns the hidden size. Extra columns are allowed."""
    hidden_field = schema.field("teacher_hidden") if "teacher_hidden" in schema.names else None
    if hidden_field is None or not pa.types.is_fixed_size_list(hidden_field.type):
        raise SchemaError(f"{source}: column 'teacher_hidden' missing or not a fixed-size list of float32")
    found = hidden_field.type.list_size
    if hidden_size is not None and found != hidden_size:
        raise SchemaError(
            f"{source}: teacher_hidden has size {found}, but the model's hidden size is {hidden_size}"
        )
    for expected in output_schema(found):
        if expected.name not in schema.names:
            raise SchemaError(f"{source}: missing column {expected.name!r} ({expected.type})")
        actual = schema.field(expected.name).type
        if actual != expected.type:
            raise SchemaError(f"{source}: column {expected.name!r} is {actual}, expected {expected.type}")
    return found


class NonFiniteScore(FloatingPointError):
    """A teacher score or hidden state that is NaN or infinite (named by its pair)."""


def _concat(parts: list):
    """`teacher.TeacherScores` of consecutive chunks as one."""
    import dataclasses

    import torch

    return type(parts[0])(
        **{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(parts[0])}
    )


class BlockKillsActor(RuntimeError):
    """A block of pairs whose scoring killed its teacher actor `MAX_BLOCK_ATTEMPTS` times (named by its first pair)."""


MAX_BLOCK_ATTEMPTS = 3  # a block that killed this many teacher actors fails the stage instead of looping
# Pairs per `GenerativeReranker.score` call: bounds a call's prompts and shared prefixes.
SCORE_CHUNK_PAIRS = 256


class TeacherScorer:
    """Ray Data callable class: loads the teacher once per actor, scores a pyarrow batch of pairs (in calls of at
    most `SCORE_CHUNK_PAIRS` pairs).

    Each batch's attempts are counted in ``attempts_dir`` (one file per batch, on the actor's node, removed once
    the batch is scored): a batch that killed `MAX_BLOCK_ATTEMPTS` actors (out of memory on a huge document, a
    crash in the model) fails with `BlockKillsActor` naming its first query and document, where Ray would
    restart the actor and retry it again.

    Args:
        teacher_config: model spec, prompt and batching of the teacher.
        attempts_dir: where the attempts are counted (one folder per stage); None: not counted.
        outputs_dir: where scored batches are persisted and read back (see the module docstring); None: not.
        crash_once: test hook ``(marker_path, after_batches)``: the first actor to reach that many batches while
            the marker does not exist creates it and kills its own process, as a crashed or preempted actor would.
        crash_on_query: test hook: a batch holding this query id kills its actor every time.
        threads: torch threads of this actor; None: Ray's (its CPUs, rounded down).
    """

    def __init__(
        self,
        teacher_config: TeacherConfig,
        attempts_dir: str | None = None,
        crash_once: tuple[str, int] | None = None,
        crash_on_query: str | None = None,
        outputs_dir: str | None = None,
        threads: int | None = None,
    ):
        from .teacher import GenerativeReranker

        if threads:
            import torch

            torch.set_num_threads(threads)

        self.teacher = GenerativeReranker.from_config(teacher_config)
        self.outputs_dir = Path(outputs_dir) if outputs_dir else None
        self.persisted = {"scored": 0, "read": 0}  # this actor's pairs scored and read back (`_count`)
        self.attempts_dir = attempts_dir
        self.crash_once, self.crash_on_query = crash_once, crash_on_query
        self.batches = 0

    def _count_attempt(self, batch: pa.Table) -> Path | None:
        """Record one more attempt at ``batch``; raise `BlockKillsActor` when it has killed enough actors."""
        if self.attempts_dir is None or len(batch) == 0:
            return None
        import hashlib

        first = (batch.column("query_id")[0].as_py(), batch.column("doc_id")[0].as_py())
        last = (batch.column("query_id")[-1].as_py(), batch.column("doc_id")[-1].as_py())
        key = hashlib.sha256(repr((first, last, len(batch))).encode()).hexdigest()[:24]
        path = Path(self.attempts_dir) / key
        path.parent.mkdir(parents=True, exist_ok=True)
        attempts = int(path.read_text()) if path.is_file() else 0
        if attempts >= MAX_BLOCK_ATTEMPTS:
            raise BlockKillsActor(
                f"a batch of {len(batch)} pairs, the first (query {first[0]!r}, document {first[1]!r}), killed its "
                f"teacher actor {attempts} times (out of memory on a long document? lower teacher.prompt."
                "max_doc_tokens or teacher.max_batch_tokens, or give the actors more memory)"
            )
        path.write_text(str(attempts + 1))
        return path

    def _persisted(self, batch: pa.Table) -> Path:
        """Where ``batch``'s scores are persisted: named by a hash of its ids and texts, in order."""
        import hashlib

        digest = hashlib.sha256()
        for name in ("query_id", "doc_id", "query_text", "doc_text"):
            for value in batch.column(name).to_pylist():
                digest.update(value.encode("utf-8", "surrogatepass") + b"\0")
        return self.outputs_dir / f"{digest.hexdigest()[:32]}.parquet"

    def _count(self, kind: str, rows: int) -> None:
        """Add ``rows`` to this actor's count of pairs ``scored`` or ``read`` back, and write the counts where
        `persisted_counts` sums them (one file per actor)."""
        self.persisted[kind] += rows
        path = self.outputs_dir / "_counts" / f"{os.getpid()}-{id(self)}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(self.persisted))

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.outputs_dir is None:
            return self._score(batch)
        import pyarrow.parquet as pq

        path = self._persisted(batch)
        if path.is_file():
            self._count("read", len(batch))
            return pq.read_table(path)
        out = self._score(batch)
        staging = path.with_name(f".{path.name}.{os.getpid()}")
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(out, staging)
        os.replace(staging, path)
        self._count("scored", len(batch))
        return out

    def _score(self, batch: pa.Table) -> pa.Table:
        attempt = self._count_attempt(batch)
        if self.crash_once is not None:
            marker, after = self.crash_once
            if self.batches >= after and not os.path.exists(marker):
                Path(marker).write_text(str(os.getpid()))
                os._exit(1)
        if self.crash_on_query is not None and self.crash_on_query in batch.column("query_id").to_pylist():
            os._exit(1)
        self.batches += 1
        queries, documents = batch.column("query_text").to_pylist(), batch.column("doc_text").to_pylist()
        chunk = SCORE_CHUNK_PAIRS
        parts = [
            self.teacher.score(queries[start : start + chunk], documents[start : start + chunk])
            for start in range(0, max(len(queries), 1), chunk)
        ]
        out = parts[0] if len(parts) == 1 else _concat(parts)
        hidden = out.hidden.numpy().astype(np.float32, copy=False)
        broken = ~np.isfinite(out.score.numpy()) | ~np.isfinite(hidden).all(axis=1)
        if broken.any():
            row = int(np.flatnonzero(broken)[0])
            raise NonFiniteScore(
                f"the teacher scored {int(broken.sum())} of {len(broken)} pairs of a batch as NaN or infinite, the "
                f"first (query {batch.column('query_id')[row].as_py()!r}, document "
                f"{batch.column('doc_id')[row].as_py()!r}): score {float(out.score[row])}; a broken model or "
                "checkpoint, or a numerical overflow (try teacher.dtype=float32)"
            )
        d = hidden.shape[1]
        columns = {name: batch.column(name) for name in PAIR_SCHEMA.names}
        columns.update(
            teacher_score=pa.array(out.score.numpy(), pa.float32()),
            logp_yes=pa.array(out.logp_yes.numpy(), pa.float32()),
            logp_no=pa.array(out.logp_no.numpy(), pa.float32()),
            teacher_hidden=pa.FixedSizeListArray.from_arrays(pa.array(hidden.reshape(-1)), d),
            query_tokens=pa.array(out.query_tokens.numpy(), pa.int32()),
            doc_tokens=pa.array(out.doc_tokens.numpy(), pa.int32()),
            truncated=pa.array(out.truncated.numpy(), pa.bool_()),
        )
        if attempt is not None:
            attempt.unlink(missing_ok=True)
        return pa.table(columns, schema=output_schema(d))


def sharing_order(pairs: pa.Table, teacher: TeacherConfig) -> pa.Table:
    """``pairs`` sorted by the slot the teacher's prompt puts first (document then query for a document-first
    preset, query then document for a query-first one): each teacher batch then runs that slot's prefix once for
    all the pairs it holds it with (`backbone.shared_prefix_last_hidden`)."""
    keys = ["query_id", "doc_id"] if PRESETS[teacher.prompt.preset].query_first else ["doc_id", "query_id"]
    return pairs.sort_by([(key, "ascending") for key in keys])


def pairs_dataset(pairs: pa.Table, rows_per_block: int = 256, whole_queries: bool = False):
    """A Ray Dataset of candidate pairs (`PAIR_SCHEMA`), split into blocks so several actors share the work.

    With ``whole_queries`` the pairs are grouped by query (a stable sort, keeping each query's candidate order)
    and a block ends at a query boundary: each block holds whole candidate lists of about ``rows_per_block``
    rows (a list longer than that is a block of its own). A teacher stage that maps whole blocks
    (``teacher_stage(..., batch_size=None)``) keeps them whole, and so does a split that hands out whole blocks
    (`raytrain.WholeBlockSplit`): what training needs for its listwise terms.
    """
    import ray.data

    if not whole_queries:
        blocks = [pairs.slice(i, rows_per_block) for i in range(0, max(len(pairs), 1), rows_per_block)]
        return ray.data.from_arrow(blocks)
    query_ids = pairs.column("query_id").to_pylist()
    if any(a > b for a, b in zip(query_ids, query_ids[1:])):
        import pyarrow.compute as pc

        pairs = pairs.take(pc.sort_indices(pairs, sort_keys=[("query_id", "ascending")]))  # stable
        query_ids = pairs.column("query_id").to_pylist()
    blocks, start = [], 0
    for row in range(1, len(query_ids) + 1):
        at_boundary = row == len(query_ids) or query_ids[row] != query_ids[row - 1]
        if at_boundary and (row - start >= rows_per_block or row == len(query_ids)):
            blocks.append(pairs.slice(start, row - start))
            start = row
    return ray.data.from_arrow(blocks or [pairs])


def teacher_stage(
    pairs,
    teacher: TeacherConfig | str,
    actors: tuple[int, int] = (1, 1),
    gpus_per_actor: float | None = None,
    cpus_per_actor: float = 1.0,
    batch_size: int | None = 64,
    max_restarts: int = -1,
    max_task_retries: int = -1,
    crash_once: tuple[str, int] | None = None,
    crash_on_query: str | None = None,
    outputs_dir: str | Path | None = None,
    threads: int | None = None,
):
    """Score a Dataset of candidate pairs with teacher actors; lazy (nothing runs until consumed).

    Args:
        pairs: a Ray Dataset with the `PAIR_SCHEMA` columns (see `pairs_dataset`).
        teacher: a `TeacherConfig`, or a model spec with the default prompt.
        actors: ``(min, max)`` actor-pool size; the pool autoscales in between.
        gpus_per_actor: GPUs per actor; ``None`` means 1 when the cluster has GPUs, else 0.
        cpus_per_actor: CPUs per actor (fractions let other stages run beside it on small machines).
        batch_size: rows per ``map_batches`` call; the teacher further batches by tokens inside. ``None``: one
            call per block, which keeps blocks as they are (whole candidate lists, see `pairs_dataset`).
        max_restarts, max_task_retries: actor restarts and per-batch retries after a crash (-1: unlimited, Ray
            Data's default). A batch's retries are bounded all the same: one that killed `MAX_BLOCK_ATTEMPTS`
            actors fails the stage naming its first pair (`TeacherScorer`), while actors lost for other reasons (a
            preempted node) are always replaced.
        crash_once, crash_on_query: `TeacherScorer`'s test hooks.
        outputs_dir: persist scored batches there and read them back when scored before (see the module
            docstring); on storage every node reaches, as a Ray Train run's.
        threads: torch threads per actor (None: Ray's, its CPUs rounded down).
    """
    import tempfile
    import uuid

    from ray.data import ActorPoolStrategy

    config = teacher if isinstance(teacher, TeacherConfig) else TeacherConfig(model=teacher)
    if gpus_per_actor is None:
        from .runtime import default_gpus

        gpus_per_actor = default_gpus(None)
    min_size, max_size = actors
    if not 1 <= min_size <= max_size:
        raise ValueError(f"actors must satisfy 1 <= min <= max, got {actors}")
    # Ray Data already gives actor pools unlimited restarts and task retries (-1); pass them only when
    # different, since Ray deprecates these extra remote args.
    fault_args = {
        name: value
        for name, value in (("max_restarts", max_restarts), ("max_task_retries", max_task_retries))
        if value != -1
    }
    return pairs.map_batches(
        TeacherScorer,
        fn_constructor_kwargs={
            "teacher_config": config,
            # One folder per stage on each node: the attempts of another stage or run never count here.
            "attempts_dir": str(Path(tempfile.gettempdir()) / f"rabtriever-teacher-{uuid.uuid4().hex[:12]}"),
            "crash_once": crash_once,
            "crash_on_query": crash_on_query,
            "outputs_dir": str(outputs_dir) if outputs_dir else None,
            "threads": threads,
        },
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=min_size, max_size=max_size),
        num_gpus=gpus_per_actor,
        num_cpus=cpus_per_actor,
        **fault_args,
    )


def score_pairs(
    pairs: pa.Table,
    teacher: TeacherConfig,
    actors: tuple[int, int] = (1, 1),
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float | None = None,
    batch_size: int = 256,
    title: str = "teacher: validation pairs",
) -> pa.Table:
    """Score an in-process table of pairs (validation, evaluation) with teacher actors, in `sharing_order`
    (each batch runs a shared prefix once for its pairs), and gather the scored rows here under a progress
    bar; the rows come back in that order."""
    from . import console

    stage = teacher_stage(
        pairs_dataset(sharing_order(pairs, teacher), batch_size),
        teacher,
        actors=actors,
        cpus_per_actor=cpus_per_actor,
        gpus_per_actor=gpus_per_actor,
        batch_size=batch_size,
    )
    with console.stage(title, len(pairs), "pairs") as bar:
        return console.collect_rows(stage, bar)
