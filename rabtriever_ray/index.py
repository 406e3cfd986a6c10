"""Document index: the corpus encoded once by the frozen backbone, first-stage vectors in a FAISS index.

`build_index` streams the corpus through a Ray Data actor pool (`DocumentEncoder`, GPUs when the cluster has
them), writes the encodings as Parquet and builds a FAISS inner-product index over ``doc_vec`` from those files,
one at a time (`faiss_build.faiss_index_from_chunks`: peak memory is the index plus one file's vectors; IVF trains
on a seeded sample from every file). The output folder (written atomically, manifest last):

- ``embeddings/*.parquet``, in FAISS id order (file order in the manifest, then row order):

  ==========  ==========================  ==================================================================
  column      dtype                       meaning
  ==========  ==========================  ==================================================================
  doc_id      string                      document ``_id``
  doc_text    string                      the document as the model reads it (title, newline, text)
  doc_hidden  fixed_size_list<float32>[d] pre-norm hidden state at the document's last token
                                          (`Rabtriever.encode_documents`); the predictor's input
  doc_vec     fixed_size_list<float32>[k] ``normalize(d_proj(doc_hidden))`` (`Rabtriever.embed_documents`);
                                          inner product with a query's ``q_proj`` vector is the first stage
  ==========  ==========================  ==================================================================

- ``index.faiss``: ``flat`` (exact), ``hnsw`` or ``ivf`` over ``doc_vec``, inner product (built on GPUs when
  ``faiss.get_num_gpus() > 0``, for flat and IVF; saved as a CPU index).
- ``manifest.json``: model spec, prompt, checkpoint and its SHA-256, dimensions, count, index type and parameters.

``doc_hidden`` depends only on the backbone and the prompt; ``doc_vec`` also on the checkpoint's ``d_proj``.
`DocumentIndex.check_compatible` refuses a student whose model, prompt, sizes or checkpoint differ.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from .config import IndexConfig, TeacherConfig, actor_range, prompt_differences, to_dict
from .faiss_build import IndexType, faiss_index, faiss_index_from_chunks, matrix_of
from .io import MANIFEST

logger = logging.getLogger(__name__)

INDEX_FORMAT = "rabtriever-index/1"


class IndexFolderError(ValueError):
    """An index folder that is incomplete, corrupt, or built for another model or checkpoint."""


def embedding_schema(hidden_size: int, proj_dim: int) -> pa.Schema:
    return pa.schema(
        [
            ("doc_id", pa.string()),
            ("doc_text", pa.string()),
            ("doc_hidden", pa.list_(pa.float32(), hidden_size)),
            ("doc_vec", pa.list_(pa.float32(), proj_dim)),
        ]
    )


def _fixed_list(matrix: np.ndarray) -> pa.FixedSizeListArray:
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


def encode_corpus(student, doc_ids: Sequence[str], doc_texts: Sequence[str]) -> pa.Table:
    """Encode documents with a student: a table in `embedding_schema` (the rows of ``embeddings/``)."""
    with torch.no_grad():
        hidden = student.encode_documents(list(doc_texts))
        vectors = student.embed_documents(hidden).float().cpu()
    return pa.table(
        {
            "doc_id": pa.array(list(doc_ids), pa.string()),
            "doc_text": pa.array(list(doc_texts), pa.string()),
            "doc_hidden": _fixed_list(hidden.numpy()),
            "doc_vec": _fixed_list(vectors.numpy()),
        },
        schema=embedding_schema(hidden.shape[1], vectors.shape[1]),
    )


class DocumentEncoder:
    """Ray Data callable class: loads the student once per actor (``checkpoint``: a folder or a
    `ray.train.Checkpoint`), encodes a pyarrow batch of documents."""

    def __init__(self, checkpoint: str | Any, teacher: TeacherConfig | None = None):
        from .student import load_student

        self.student = load_student(checkpoint, teacher)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return encode_corpus(
            self.student, batch.column("doc_id").to_pylist(), batch.column("doc_text").to_pylist()
        )


def encode_corpus_dataset(
    corpus: Any,
    checkpoint: str | Any,
    teacher: TeacherConfig | None,
    batch_size: int,
    actors: tuple[int, int],
    cpus_per_actor: float,
    gpus_per_actor: float,
):
    """``corpus`` encoded by a checkpoint's student on a Ray Data pool of `DocumentEncoder` actors (``actors``:
    MIN, MAX): a lazy Dataset of `embedding_schema` rows in batches of ``batch_size`` documents.

    ``corpus`` is a Ray Dataset with ``doc_id`` and ``doc_text`` (`data.read_corpus_dataset`; an in-process
    corpus through `data.as_datasets`).
    """
    from ray.data import ActorPoolStrategy

    return corpus.map_batches(
        DocumentEncoder,
        fn_constructor_kwargs={"checkpoint": checkpoint, "teacher": teacher},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=actors[0], max_size=actors[1]),
        num_gpus=gpus_per_actor,
        num_cpus=cpus_per_actor,
    )


class QueryEncoder:
    """Ray Data callable class, the query side of `DocumentEncoder`: a batch of queries (``query_id``,
    ``query_text``) to their first-stage vectors ``q_vec`` (fixed_size_list<float32>[k],
    ``normalize(q_proj(encode_queries(text)))``: `Rabtriever.embed_queries`), what a ``doc_vec`` index is searched
    with."""

    def __init__(self, checkpoint: str | Any, teacher: TeacherConfig | None = None):
        from .student import load_student

        self.student = load_student(checkpoint, teacher)

    def __call__(self, batch: pa.Table) -> pa.Table:
        with torch.no_grad():
            hidden = self.student.encode_queries(batch.column("query_text").to_pylist())
            vectors = self.student.embed_queries(hidden).float().cpu()
        return pa.table({"query_id": batch.column("query_id"), "q_vec": _fixed_list(vectors.numpy())})


def _write_faiss_index(
    folder: str, files: list[str], count: int, dim: int, index_type: IndexType, hnsw_m: int, nlist: int | None
) -> int | None:
    """Build the FAISS index over ``folder/embeddings/<files>`` (``doc_vec``, file by file, in FAISS id order) and
    write ``folder/index.faiss``; returns the IVF list count (None for other types)."""
    import faiss
    import pyarrow.parquet as pq

    embeddings = Path(folder) / "embeddings"

    def vectors() -> Iterator[np.ndarray]:
        for name in files:
            yield matrix_of(pq.read_table(embeddings / name, columns=["doc_vec"])["doc_vec"], dim)

    index = faiss_index_from_chunks(vectors, count, dim, index_type, hnsw_m, nlist)
    faiss.write_index(index, str(Path(folder) / "index.faiss"))
    return int(index.nlist) if index_type == "ivf" else None


def build_index(config: IndexConfig) -> dict[str, Any]:
    """Encode a BEIR corpus with a checkpoint's student on Ray Data and write an index folder (every option:
    `IndexConfig`); returns the manifest."""
    import pyarrow.parquet as pq
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .data import read_corpus_dataset
    from .io import atomic_dir, write_json_atomic
    from .runtime import default_gpus, init_ray
    from .student import checkpoint_digest, load_student_info

    start = time.perf_counter()
    checkpoint = Path(config.checkpoint).resolve()
    info = load_student_info(checkpoint, config.teacher)  # a bad checkpoint fails before any work
    with atomic_dir(config.out, config.overwrite) as staging:
        init_ray()
        # Read and validated in Ray tasks: the driver holds counts, not the corpus.
        corpus, n_docs, rejects = read_corpus_dataset(config.data, on_bad_row=config.on_bad_row)  # type: ignore[arg-type]
        if not n_docs:
            raise ValueError(f"{config.data}: the corpus has no documents")
        gpus_per_actor = config.gpus_per_actor
        if gpus_per_actor is None:
            gpus_per_actor = default_gpus(None)
        encoded = encode_corpus_dataset(
            corpus,
            str(checkpoint),
            info["teacher_config"],
            config.batch_size,
            actor_range(config.actors),
            config.cpus_per_actor,
            gpus_per_actor,
        )
        encoded.write_parquet(str(staging / "embeddings"))
        files = sorted(p.name for p in (staging / "embeddings").glob("*.parquet"))
        count = sum(pq.ParquetFile(staging / "embeddings" / f).metadata.num_rows for f in files)
        if count != n_docs:
            raise RuntimeError(f"encoded {count} documents of {n_docs}")
        proj_dim = pq.read_schema(staging / "embeddings" / files[0]).field("doc_vec").type.list_size
        encode_s = time.perf_counter() - start
        # Built in a task on this node (where the folder is), file by file: its peak memory is the index plus
        # one file, and the driver's does not grow with the corpus.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        write_index = ray.remote(_write_faiss_index).options(num_cpus=0.5, scheduling_strategy=here)
        nlist = ray.get(
            write_index.remote(
                str(staging), files, count, proj_dim, config.index_type, config.hnsw_m, config.nlist
            )
        )
        if rejects:
            from .data import write_rejects

            write_rejects(rejects, staging / "rejects.jsonl")
        manifest = {
            "format": INDEX_FORMAT,
            "data": str(config.data),
            "checkpoint": str(checkpoint),
            "checkpoint_sha256": checkpoint_digest(checkpoint),
            "teacher": to_dict(info["teacher_config"]),
            "hidden_size": info["hidden_size"],
            "proj_dim": proj_dim,
            "count": count,
            "index_type": config.index_type,
            "index_params": {"hnsw_m": config.hnsw_m}
            if config.index_type == "hnsw"
            else {"nlist": nlist}
            if config.index_type == "ivf"
            else {},
            "files": files,
            "rejected_rows": len(rejects),
            "encode_s": round(encode_s, 2),
            "elapsed_s": round(time.perf_counter() - start, 2),
        }
        write_json_atomic(staging / MANIFEST, manifest)
    return manifest


@dataclass
class DocumentIndex:
    """An index in memory: FAISS over ``doc_vec`` plus ids, texts and hidden states in FAISS id order."""

    doc_ids: list[str]
    doc_text: list[str]
    doc_hidden: torch.Tensor  # [n, d] float32, or float16 when loaded so (`Rabtriever` scores it in float32)
    faiss: Any
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path, hidden_dtype: Literal["float32", "float16"] = "float32") -> DocumentIndex:
        """The index folder ``path`` in memory, ``doc_hidden`` as ``hidden_dtype``: float16 halves its
        ``n * d * 4`` bytes; states beyond float16's range (some LLMs have a few huge dimensions) keep float32."""
        import faiss
        import pyarrow.parquet as pq

        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise IndexFolderError(f"{path}: no {MANIFEST}; not a finished jobs/index.py output")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != INDEX_FORMAT:
            raise IndexFolderError(
                f"{manifest_path}: format {manifest.get('format')!r}, expected {INDEX_FORMAT!r}"
            )
        tables = []
        for name in manifest["files"]:
            file = path / "embeddings" / name
            if not file.is_file():
                raise IndexFolderError(f"{path}: missing {file.relative_to(path)} named in the manifest")
            tables.append(pq.read_table(file, columns=["doc_id", "doc_text", "doc_hidden"]))
        table = pa.concat_tables(tables)
        hidden_type = table.schema.field("doc_hidden").type
        if not pa.types.is_fixed_size_list(hidden_type) or hidden_type.list_size != manifest["hidden_size"]:
            raise IndexFolderError(
                f"{path}: doc_hidden is {hidden_type}, manifest says {manifest['hidden_size']}"
            )
        index = faiss.read_index(str(path / "index.faiss"))
        if index.ntotal != table.num_rows or table.num_rows != manifest["count"]:
            raise IndexFolderError(
                f"{path}: {index.ntotal} vectors in index.faiss, {table.num_rows} embedding rows, "
                f"manifest count {manifest['count']}"
            )
        if index.d != manifest["proj_dim"]:
            raise IndexFolderError(
                f"{path}: index.faiss has dimension {index.d}, manifest says {manifest['proj_dim']}"
            )
        hidden = matrix_of(table.column("doc_hidden"), manifest["hidden_size"])
        if hidden_dtype == "float16":
            half = hidden.astype(np.float16)
            if np.isfinite(half).all():
                hidden = half
            else:  # past float16's 65504 (the float32 states are finite)
                logger.warning("%s: hidden states beyond float16's range; keeping them in float32", path)
        return cls(
            doc_ids=table.column("doc_id").to_pylist(),
            doc_text=table.column("doc_text").to_pylist(),
            doc_hidden=torch.from_numpy(hidden if hidden.dtype == np.float16 else hidden.copy()),
            faiss=index,
            manifest=manifest,
        )

    @classmethod
    def from_table(cls, table: pa.Table, index_type: IndexType = "flat", **manifest: Any) -> DocumentIndex:
        """An in-memory index from `encode_corpus` output (no files; what evaluation uses)."""
        hidden_size = table.schema.field("doc_hidden").type.list_size
        proj_dim = table.schema.field("doc_vec").type.list_size
        return cls(
            doc_ids=table.column("doc_id").to_pylist(),
            doc_text=table.column("doc_text").to_pylist(),
            doc_hidden=torch.from_numpy(matrix_of(table.column("doc_hidden"), hidden_size).copy()),
            faiss=faiss_index(matrix_of(table.column("doc_vec"), proj_dim), index_type),
            manifest={"hidden_size": hidden_size, "proj_dim": proj_dim, "count": table.num_rows, **manifest},
        )

    def __len__(self) -> int:
        return len(self.doc_ids)

    def check_compatible(self, student, teacher: TeacherConfig, checkpoint: str | Path | None = None) -> None:
        """Refuse a student whose backbone, prompt, sizes or (when given) checkpoint differ from the index's."""
        problems = []
        m = self.manifest
        if m.get("hidden_size") != student.hidden_size:
            problems.append(f"hidden size {m.get('hidden_size')} != model's {student.hidden_size}")
        if m.get("proj_dim") != student.config.proj_dim:
            problems.append(
                f"vector size {m.get('proj_dim')} != checkpoint's proj_dim {student.config.proj_dim}"
            )
        if "teacher" in m:
            built = m["teacher"]
            if built["model"] != teacher.model:
                problems.append(f"built with model {built['model']!r}, searching with {teacher.model!r}")
            if prompt_differences(built["prompt"], to_dict(teacher.prompt)):
                problems.append("built with another prompt than the checkpoint's")
        if checkpoint is not None and "checkpoint_sha256" in m:
            from .student import checkpoint_digest

            if checkpoint_digest(checkpoint) != m["checkpoint_sha256"]:
                problems.append(
                    f"built with checkpoint {m.get('checkpoint')} (another student.safetensors): "
                    "its doc_vec come from another d_proj; rebuild the index with jobs/index.py"
                )
        if problems:
            raise IndexFolderError("index does not match the checkpoint: " + "; ".join(problems))

    def search(
        self, query_vectors: np.ndarray, k: int, nprobe: int | None = None, ef_search: int | None = None
    ):
        """FAISS top ``k`` by inner product: (scores ``[n, k]``, FAISS ids ``[n, k]``; -1 where fewer exist)."""
        k = min(k, len(self))
        if nprobe is not None and hasattr(self.faiss, "nprobe"):
            self.faiss.nprobe = nprobe
        if hasattr(self.faiss, "hnsw"):
            self.faiss.hnsw.efSearch = max(ef_search or 64, k)
        return self.faiss.search(np.ascontiguousarray(query_vectors, dtype=np.float32), k)
