"""A worker's teacher batches: the teacher stage's rows as training batches of whole candidate lists.

`TeacherStream` reads a worker's shard of teacher-stage rows (`pipeline.output_schema`) once, grouped by query
(`candidate_lists`) and packed into batches of whole lists; `BatchStore` keeps those batches for the epochs after
the first (in memory, then on local disk); `epoch_batches` gives every worker the same number of batches per epoch,
replaying stored ones where its shard is short; `teacher_batch_tensors` turns a batch into the tensors one training
step takes (`distill_loop.distill_losses`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch


def teacher_batch_tensors(batch) -> dict:
    """A pyarrow batch of teacher-stage rows -> the tensors and lists one training step needs."""
    hidden = batch.column("teacher_hidden").combine_chunks()
    width = hidden.type.list_size
    return {
        "query_id": batch.column("query_id").to_pylist(),
        "query_text": batch.column("query_text").to_pylist(),
        "doc_text": batch.column("doc_text").to_pylist(),
        "teacher_score": torch.from_numpy(
            np.array(batch.column("teacher_score").to_numpy(), dtype=np.float32)
        ),
        "teacher_hidden": torch.from_numpy(
            np.array(hidden.flatten().to_numpy(), dtype=np.float32).reshape(-1, width)
        ),
    }


class TeacherStream:
    """One pass over a worker's shard of teacher-stage rows, as training batches (pyarrow tables, for
    `teacher_batch_tensors`) of whole candidate lists.

    A block of the shard holds whole candidate lists (`pipeline.pairs_dataset` with ``whole_queries``, split by
    `raytrain.WholeBlockSplit`); `candidate_lists` groups its rows by query. A batch takes whole lists
    while they fit in ``batch_size`` rows (a longer list is a batch of its own), so the listwise terms see every
    candidate of each query; every row read is trained on. ``rows`` counts the rows read so far.
    """

    def __init__(self, shard, batch_size: int):
        self.shard, self.batch_size, self.rows = shard, batch_size, 0

    def _blocks(self):
        for block in self.shard.iter_batches(batch_size=None, batch_format="pyarrow"):
            self.rows += block.num_rows
            yield block

    def __iter__(self):
        batch, rows = [], 0
        for group in candidate_lists(self._blocks()):
            if batch and rows + group.num_rows > self.batch_size:
                yield pa.concat_tables(batch).combine_chunks()
                batch, rows = [], 0
            batch.append(group)
            rows += group.num_rows
        if batch:
            yield pa.concat_tables(batch).combine_chunks()


def candidate_lists(blocks):
    """Each query's rows in a stream of pyarrow tables, one table per query: the rows of a block grouped by
    ``query_id`` (in order of first appearance), and a block's last list joined with the next block's first when
    they are the same query (a list that continues across blocks)."""
    pending: tuple[str, pa.Table] | None = None  # a block's last list: it may continue in the next block
    for block in blocks:
        rows: dict[str, list[int]] = {}
        for index, query in enumerate(block.column("query_id").to_pylist()):
            rows.setdefault(query, []).append(index)
        lists = [(query, block.take(indices)) for query, indices in rows.items()]
        if not lists:
            continue
        if pending is not None:
            if lists[0][0] == pending[0]:
                lists[0] = (pending[0], pa.concat_tables([pending[1], lists[0][1]]))
            else:
                yield pending[1]
        for _, table in lists[:-1]:
            yield table
        pending = lists[-1]
    if pending is not None:
        yield pending[1]


class BatchStore:
    """A worker's teacher batches (pyarrow tables), kept for the epochs after the first: in memory up to
    ``max_bytes``, the rest spilled to Arrow IPC files in ``directory`` and read back memory-mapped.

    A list as `epoch_batches` uses one: ``append``, ``len`` and indexing.
    """

    def __init__(self, max_bytes: int, directory: str | Path):
        self.max_bytes, self.directory = max_bytes, Path(directory)
        self._batches: list = []  # a table in memory, or the path of its spilled file
        self.bytes = 0  # in memory
        self.spilled = 0

    def __len__(self) -> int:
        return len(self._batches)

    def append(self, table) -> None:
        if self.bytes + table.nbytes <= self.max_bytes:
            self._batches.append(table)
            self.bytes += table.nbytes
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"batch-{len(self._batches):07d}.arrow"
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        self._batches.append(path)
        self.spilled += 1

    def __getitem__(self, index: int):
        batch = self._batches[index]
        if isinstance(batch, Path):
            return pa.ipc.open_file(pa.memory_map(str(batch))).read_all()
        return batch


def epoch_batches(stored: list, fresh, steps: int, generator: torch.Generator):
    """Exactly ``steps`` training batches for one epoch, the same count on every worker (DDP steps together).

    ``fresh`` (the first pass over the teacher stream, or None): its batches come first and are appended to
    ``stored``; a shard shorter than ``steps`` batches goes on with replays of what it read, and one longer is
    read to its end, the rest stored for later epochs. Later epochs draw from ``stored`` in a seeded random
    order, as many passes as ``steps`` needs.
    """
    given = 0
    if fresh is not None:
        for batch in fresh:
            stored.append(batch)
            if given < steps:
                given += 1
                yield batch
    if given < steps and not stored:
        raise RuntimeError(
            "this worker's share of the training data is empty: there are fewer blocks of candidate lists than "
            "workers; use fewer workers (num_workers) or more training queries"
        )
    while given < steps:
        for index in torch.randperm(len(stored), generator=generator).tolist()[: steps - given]:
            given += 1
            yield stored[index]
