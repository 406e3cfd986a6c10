"""Candidate specs: the value of a key that says where a query's candidate documents come from.

The keys that take one (``candidates``, ``val_candidates``, ``round_pool``, ``negatives_from``) are parsed by
`parse_spec` when their config is built, so a bad value stops the job at load with the key named. The forms:

- ``all``: every document for every query;
- ``bm25:K``: the top K documents per query by BM25;
- ``random:K``: K documents per query drawn uniformly without replacement, the same for a query and seed in any
  run (a student judged on every document learns the whole of its teacher's ranking from them, not only the top);
- ``student:K``: the top K of the whole corpus by the previous round's student's own first stage (only where a
  student exists: ``round_pool``);
- anything else: a path to a TREC run (``qid Q0 docid rank score tag``): a file or a folder of shards, which must exist.

Standard library only: the config package imports this module without pulling in torch, Ray or pyarrow.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Kind = Literal["all", "bm25", "random", "student", "run"]

# How each kind is written, in the order the accepted forms are listed in errors.
_FORMS: dict[str, str] = {
    "all": "all",
    "bm25": "bm25:K",
    "random": "random:K",
    "student": "student:K",
    "run": "a path to a TREC run file",
}
# The kinds each key takes: a pair's candidates, a teacher fine-tuning group's negatives, a later round's pool.
CANDIDATES: tuple[Kind, ...] = ("all", "bm25", "random", "run")
NEGATIVE_POOLS: tuple[Kind, ...] = ("all", "bm25")
ROUND_POOLS: tuple[Kind, ...] = ("all", "bm25", "student", "run")


@dataclass(frozen=True)
class CandidateSpec:
    """A parsed candidate spec: ``kind``, with ``k`` (the K of ``bm25:K``, ``random:K``, ``student:K``) or ``path`` (a run
    file's, as given). ``str(spec)`` is its text, which `parse_spec` reads back to the same spec."""

    kind: Kind
    k: int | None = None
    path: Path | None = None

    @property
    def text(self) -> str:
        """The spec as a config key takes it (``bm25:8``, a run file's path)."""
        if self.kind == "all":
            return "all"
        return str(self.path) if self.kind == "run" else f"{self.kind}:{self.k}"

    @property
    def is_run(self) -> bool:
        """Whether the candidates come from a run file."""
        return self.kind == "run"

    def __str__(self) -> str:
        return self.text


def parse_spec(
    text: str, key: str, allowed: Collection[Kind] = CANDIDATES, error: type[Exception] = ValueError
) -> CandidateSpec:
    """``text`` as given to config key ``key``, which takes the kinds in ``allowed``; ``error`` (a config's or a
    reader's error class) names the key, the value and what the key accepts, e.g. ``candidates 'bm25:x': bm25:K
    needs an integer K; expected all, bm25:K (K an integer >= 1) or a path to a TREC run file``.

    A run file must exist when the spec is parsed (a relative path is read from the working directory).
    """
    forms = [_FORMS[kind] for kind in _FORMS if kind in allowed]
    with_k = [i for i, form in enumerate(forms) if form.endswith(":K")]
    if with_k:
        forms[with_k[-1]] += " (K an integer >= 1)"
    expected = forms[0] if len(forms) == 1 else f"{', '.join(forms[:-1])} or {forms[-1]}"

    def refuse(problem: str = "") -> Exception:
        return error(f"{key} {text!r}: {problem + '; ' if problem else ''}expected {expected}")

    if not text.strip():
        raise refuse("empty")
    name, colon, count = text.partition(":")
    kind: Kind = "all" if text == "all" else "run"
    if colon and name in ("bm25", "random", "student"):
        kind = name  # type: ignore[assignment]
    if kind not in allowed:
        raise refuse("" if kind == "run" else f"{_FORMS[kind]} is not accepted here")
    if kind == "all":
        return CandidateSpec("all")
    if kind == "run":
        if not Path(text).exists():  # a run file, or a folder of run shards
            raise refuse(f"no run file at {text}")
        return CandidateSpec("run", path=Path(text))
    try:
        k = int(count)
    except ValueError:
        raise refuse(f"{name}:K needs an integer K") from None
    if k < 1:
        raise refuse("K must be >= 1")
    return CandidateSpec(kind, k=k)
