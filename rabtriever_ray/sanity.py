"""The teacher sanity report: a mis-prompted or degenerate teacher shows in its scores' shape within a minute,
not after the distillation.

`teacher_sanity(table)` reads a table of candidate lists (``query_id``, ``doc_id`` and a score column, one row per
(query, document) pair, a query's rows in any order) and measures, grouped by query with numpy sorting (no loop
over rows or queries; a million rows take well under a second):

- ``queries``, ``pairs`` (rows) and the scores' ``min``, ``max``, ``mean``; ``non_finite``: rows whose score is NaN
  or infinite (left out of everything else);
- ``std_median``: the median over queries of the scores' standard deviation within the query (population std),
  and ``flat_queries``: the share of queries whose std is below `FLAT_STD` (queries with one candidate have no
  spread to measure and count in neither);
- ``tied_pairs``: the share of tied candidate pairs, over all pairs of two documents of the same query. Two scores
  tie when they differ by at most `TIE_TOLERANCE`; a query's sorted scores that are each within it of the next form
  one tied group (for float32 teacher scores, about the spacing of representable values, so in practice: equal);
- ``top1``: the document ranked first for the most queries (equal counts: the smallest doc id), the number and
  ``share`` of queries that rank it first, and ``uniform_share``: the share a judge choosing each query's first
  document uniformly at random among its candidates would give that document. A query whose two best scores tie
  ranks no document first (its tie shows in ``tied_pairs``), so a constant teacher has no top-1 document
  (``doc_id`` None); `report.top1_and_cost` breaks such ties by doc id instead.

``warnings`` lists what looks wrong, each a sentence a user can act on:

- scores barely vary: more than `MAX_FLAT_SHARE` (50%) of queries have a std below `FLAT_STD` (1e-3); the usual
  cause is a prompt other than the one the teacher was trained with (``prompt.preset``), which leaves the answer
  token's probabilities where they start;
- one document comes first for too many queries: more than `TOP1_FACTOR` (3x) its uniform share, more than
  `MAX_TOP1_SHARE` (25%) of queries and at least `MIN_TOP1_QUERIES` (5) queries (fewer is chance on a tiny run): a
  judge biased towards one document, as a zero-shot instruct model often is;
- ties: more than `MAX_TIED_SHARE` (20%) of candidate pairs tie: the student's listwise losses learn nothing from
  a tie;
- any non-finite score (a numerical overflow in the teacher).

`format_sanity(sanity)` gives the few console lines that ``jobs/score_teacher.py`` and ``jobs/distill.py`` print.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FLAT_STD = 1e-3
MAX_FLAT_SHARE = 0.5
TIE_TOLERANCE = 1e-6
MAX_TIED_SHARE = 0.2
TOP1_FACTOR = 3.0
MAX_TOP1_SHARE = 0.25
MIN_TOP1_QUERIES = 5


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray, pa.Array]:
    """``(codes, ranks, values)``: each row's index into the column's distinct ``values``, and each distinct value's
    position in sorted (string) order."""
    encoded = column.combine_chunks().dictionary_encode()
    ranks = np.empty(len(encoded.dictionary), dtype=np.int64)
    ranks[pc.sort_indices(encoded.dictionary).to_numpy()] = np.arange(len(ranks))
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), ranks, encoded.dictionary


def teacher_sanity(table: pa.Table, score_column: str = "teacher_score") -> dict[str, Any]:
    """The sanity figures and warnings of a table of scored candidate lists (see the module docstring).

    ``table`` needs ``query_id`` and ``doc_id`` (strings) and ``score_column`` (floats); other columns are ignored.
    Returns a JSON-serialisable dict.
    """
    scores = table.column(score_column).to_numpy().astype(np.float64)
    finite = np.isfinite(scores)
    if not finite.all():
        table, scores = table.filter(pa.array(finite)), scores[finite]
    queries, _, _ = _codes(table.column("query_id"))
    docs, doc_ranks, doc_ids = _codes(table.column("doc_id"))
    n_queries = int(queries.max()) + 1 if len(queries) else 0
    sanity: dict[str, Any] = {
        "queries": n_queries,
        "pairs": len(scores),
        "non_finite": int((~finite).sum()),
        "score": {
            name: float(fn(scores)) if len(scores) else None
            for name, fn in (("min", np.min), ("max", np.max), ("mean", np.mean))
        },
    }
    # Each query's rows together, best first, equal scores by doc id (the order `metrics.ranking` gives).
    order = np.lexsort((doc_ranks[docs], -scores, queries))
    queries, docs, scores = queries[order], docs[order], scores[order]
    list_sizes = np.bincount(queries, minlength=n_queries)

    # Two passes (mean, then squared deviations) keep the std exact when scores are large and barely vary.
    divisors = np.maximum(list_sizes, 1)
    means = np.bincount(queries, scores, n_queries) / divisors
    stds = np.sqrt(np.bincount(queries, (scores - means[queries]) ** 2, n_queries) / divisors)
    stds = stds[list_sizes >= 2]
    sanity["std_median"] = float(np.median(stds)) if len(stds) else None
    sanity["flat_queries"] = float(np.mean(stds < FLAT_STD)) if len(stds) else None

    # Sorted within each query, tied scores are neighbours: runs of neighbours within the tolerance are tie groups.
    tied_with_next = (queries[1:] == queries[:-1]) & (np.diff(scores) >= -TIE_TOLERANCE)
    group_sizes = np.bincount(np.cumsum(np.concatenate([[True], ~tied_with_next])))
    all_pairs = int((list_sizes * (list_sizes - 1) // 2).sum())
    tied = int((group_sizes * (group_sizes - 1) // 2).sum())
    sanity["tied_pairs"] = tied / all_pairs if all_pairs else None

    sanity["top1"] = None
    if n_queries:
        # A query whose best two scores tie ranks no document first: the tie is reported as a tie, not as bias.
        starts = np.concatenate([[True], queries[1:] != queries[:-1]])
        firsts = docs[starts & ~np.concatenate([tied_with_next, [False]])]
        first_counts = np.bincount(firsts, minlength=len(doc_ranks))
        most = np.flatnonzero(first_counts == first_counts.max())
        top = int(most[np.argmin(doc_ranks[most])])  # equal counts: the smallest doc id
        sanity["top1"] = {
            "doc_id": doc_ids[top].as_py() if first_counts[top] else None,
            "queries": int(first_counts[top]),
            "share": float(first_counts[top] / n_queries),
            # Each query containing the document would pick it with probability 1 / its list's length.
            "uniform_share": float(np.sum(1.0 / list_sizes[queries[docs == top]]) / n_queries),
        }
    sanity["warnings"] = _warnings(sanity)
    return sanity


def _warnings(sanity: dict[str, Any]) -> list[str]:
    warnings = []
    if sanity["non_finite"]:
        warnings.append(f"{sanity['non_finite']} scores are NaN or infinite: the teacher overflowed")
    if sanity["flat_queries"] is not None and sanity["flat_queries"] > MAX_FLAT_SHARE:
        warnings.append(
            f"scores barely vary within queries (median std {sanity['std_median']:.2g}; "
            f"{sanity['flat_queries']:.0%} of queries under {FLAT_STD:g}): is the prompt the one the teacher was "
            "trained with (prompt.preset)?"
        )
    top1 = sanity["top1"]
    if (
        top1 is not None
        and top1["queries"] >= MIN_TOP1_QUERIES
        and top1["share"] > MAX_TOP1_SHARE
        and top1["share"] > TOP1_FACTOR * top1["uniform_share"]
    ):
        warnings.append(
            f"doc {top1['doc_id']} is top-1 for {top1['share']:.0%} of queries (chance: "
            f"{top1['uniform_share']:.0%}): the teacher may be biased towards it"
        )
    if sanity["tied_pairs"] is not None and sanity["tied_pairs"] > MAX_TIED_SHARE:
        warnings.append(
            f"{sanity['tied_pairs']:.0%} of candidate pairs tie (same query, scores within {TIE_TOLERANCE:g}): "
            "the student learns no order from them"
        )
    return warnings


def format_sanity(sanity: dict[str, Any]) -> str:
    """A few console lines: the figures, then one line per warning (or that there is none)."""
    if not sanity["pairs"]:
        return "Teacher sanity: no scores"
    score, top1 = sanity["score"], sanity["top1"]
    lines = [
        f"Teacher sanity: {sanity['queries']} queries, {sanity['pairs']} pairs; scores {score['min']:.3g} to "
        f"{score['max']:.3g} (mean {score['mean']:.3g})",
        f"  per-query std: median {_share_or_na(sanity['std_median'], '.3g')} "
        f"({_share_or_na(sanity['flat_queries'], '.0%')} of queries under {FLAT_STD:g}); "
        f"tied candidate pairs: {_share_or_na(sanity['tied_pairs'], '.0%')}",
    ]
    if top1["doc_id"] is not None:
        lines.append(
            f"  most frequent top-1: {top1['doc_id']} for {top1['queries']} of {sanity['queries']} queries "
            f"({top1['share']:.0%}; chance {top1['uniform_share']:.0%})"
        )
    lines += [f"  WARNING: {w}" for w in sanity["warnings"]] or ["  no warnings"]
    return "\n".join(lines)


def _share_or_na(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)
