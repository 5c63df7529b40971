"""Retrieval and STS evaluation: ranking metrics, Spearman, BEIR-format loaders, retrieval over a written table.

Metric conventions follow BEIR / pytrec_eval, so figures compare with MTEB's:
* relevance is graded: a qrels score > 0 is relevant, its value is the gain (linear, not 2^rel - 1);
* nDCG@k = DCG@k / IDCG@k with discount 1 / log2(rank + 1); the ideal ranking is built from the
  qrels, so a relevant document the system never retrieved still counts in the ideal;
* recall@k divides by every relevant document of the query, not by min(k, #relevant);
* MRR@k is 1 / rank of the first relevant document within the top k, 0 when there is none;
* a query with no relevant document in the qrels is skipped (and counted), never scored 0.

Documents are ranked by their best chunk (spec §6.4): a document's score is the maximum cosine
similarity over its chunks, so tables written with any chunking mode evaluate at document level.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model import load_encoder
from pipeline.query import open_for_queries
from pipeline.storage import StorageConfig

Qrels = dict[str, dict[str, int]]  # query id -> document id -> graded relevance (> 0: relevant)
Run = dict[str, list[str]]  # query id -> document ids, best first
Metric = Literal["ndcg", "recall", "mrr"]
StsFormat = Literal["stsbenchmark"]

RETRIEVAL_METRICS: tuple[tuple[Metric, int], ...] = (("ndcg", 10), ("recall", 100), ("mrr", 10))
QRELS_HEADER = ("query-id", "corpus-id", "score")
STS_TASK = "text-matching"  # jina-v3's adapter for symmetric similarity (spec §4); used when the model has it


# -- ranking metrics ------------------------------------------------------------------------------


def _top(ranked_ids: Sequence[str], k: int) -> Sequence[str]:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(set(ranked_ids)) != len(ranked_ids):
        raise ValueError("ranked_ids repeats a document; rank each document once (see best_chunk_ranking)")
    return ranked_ids[:k]


def _relevant(qrels: Mapping[str, int]) -> dict[str, int]:
    return {doc: rel for doc, rel in qrels.items() if rel > 0}


def ndcg_at_k(ranked_ids: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    """Normalized DCG of the top k with graded gains; 0.0 when the query has no relevant document."""
    relevant = _relevant(qrels)
    dcg = sum(relevant.get(doc, 0) / math.log2(rank + 1) for rank, doc in enumerate(_top(ranked_ids, k), 1))
    ideal = sorted(relevant.values(), reverse=True)[:k]
    idcg = sum(rel / math.log2(rank + 1) for rank, rel in enumerate(ideal, 1))
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked_ids: Sequence[str], qrels: Mapping[str, int], k: int = 100) -> float:
    """Share of the query's relevant documents found in the top k; 0.0 when it has none."""
    relevant = _relevant(qrels)
    found = sum(1 for doc in _top(ranked_ids, k) if doc in relevant)
    return found / len(relevant) if relevant else 0.0


def mrr_at_k(ranked_ids: Sequence[str], qrels: Mapping[str, int], k: int = 10) -> float:
    """Reciprocal rank of the first relevant document in the top k; 0.0 when none is there."""
    relevant = _relevant(qrels)
    for rank, doc in enumerate(_top(ranked_ids, k), 1):
        if doc in relevant:
            return 1.0 / rank
    return 0.0


METRIC_FUNCTIONS = {"ndcg": ndcg_at_k, "recall": recall_at_k, "mrr": mrr_at_k}


def score_run(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, int]], *,
              metrics: Sequence[tuple[Metric, int]] = RETRIEVAL_METRICS) -> dict:
    """Mean of each metric over the run's queries that have a relevant document.

    Returns {"ndcg@10": ..., ..., "queries": scored, "skipped": queries without relevant documents}.
    """
    for name, _ in metrics:
        if name not in METRIC_FUNCTIONS:
            raise ValueError(f"unknown metric {name!r}; valid metrics: {', '.join(METRIC_FUNCTIONS)}")
    scored = [q for q in run if _relevant(qrels.get(q, {}))]
    out: dict = {}
    for name, k in metrics:
        values = [METRIC_FUNCTIONS[name](run[q], qrels[q], k) for q in scored]
        out[f"{name}@{k}"] = float(np.mean(values)) if values else float("nan")
    out["queries"] = len(scored)
    out["skipped"] = len(run) - len(scored)
    return out


def best_chunk_ranking(hits: Iterable[tuple[str, float]]) -> list[tuple[str, float]]:
    """(document id, chunk score) hits -> one (id, best score) per document, best first.

    Ties are broken by id so that rankings are reproducible.
    """
    best: dict[str, float] = {}
    for doc, score in hits:
        if doc not in best or score > best[doc]:
            best[doc] = float(score)
    return sorted(best.items(), key=lambda item: (-item[1], item[0]))


# -- correlation ----------------------------------------------------------------------------------


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span (1, 2.5, 2.5, 4)."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    start = 0
    for stop in range(1, len(x) + 1):
        if stop == len(x) or sorted_x[stop] != sorted_x[start]:
            ranks[order[start:stop]] = (start + 1 + stop) / 2  # mean of ranks start+1 .. stop
            start = stop
    return ranks


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson correlation; nan when either side is constant."""
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 2:
        raise ValueError(f"need two 1-d sequences of equal length >= 2, got shapes {a.shape} and {b.shape}")
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float(a @ a) * float(b @ b))
    return float(a @ b) / denom if denom > 0 else float("nan")


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho: Pearson correlation of average ranks (ties handled as scipy.stats.spearmanr)."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} values but y has {len(y)}")
    return pearson(average_ranks(x), average_ranks(y))


# -- BEIR-format files ----------------------------------------------------------------------------


def _jsonl(path: str | Path) -> Iterable[dict]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not a JSON line: {err}") from None


def load_queries(path: str | Path) -> dict[str, str]:
    """BEIR queries.jsonl ({"_id", "text"} per line) -> {query id: text}."""
    return {str(row["_id"]): row["text"] for row in _jsonl(path)}


def load_qrels(path: str | Path) -> Qrels:
    """BEIR qrels TSV (query-id, corpus-id, score; optional header line) -> {query: {doc: score}}."""
    qrels: Qrels = {}
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            fields = line.rstrip("\n").split("\t")
            if not line.strip() or (n == 1 and tuple(fields[:3]) == QRELS_HEADER):
                continue
            if len(fields) < 3:
                raise ValueError(f"{path}:{n}: expected query-id<TAB>corpus-id<TAB>score, got {line.rstrip()!r}")
            try:
                score = int(fields[2])
            except ValueError:
                raise ValueError(f"{path}:{n}: score {fields[2]!r} is not an integer") from None
            qrels.setdefault(fields[0], {})[fields[1]] = score
    return qrels


def load_corpus(path: str | Path) -> list[dict[str, str]]:
    """BEIR corpus.jsonl ({"_id", "title", "text"}) -> rows {"id", "title", "text"} (title may be "")."""
    return [{"id": str(row["_id"]), "title": row.get("title") or "", "text": row["text"]} for row in _jsonl(path)]


def corpus_to_parquet(corpus_path: str | Path, out_path: str | Path) -> int:
    """Write a BEIR corpus as one Parquet file (id, title, text) for the embed job; returns the row count.

    Embed it with `--title-column title` to index "title text" as BEIR evaluations do (spec §6.4).
    """
    rows = load_corpus(corpus_path)
    columns = {name: [row[name] for row in rows] for name in ("id", "title", "text")}
    pq.write_table(pa.table(columns), out_path)
    return len(rows)


# -- retrieval over a table written by the embed job ----------------------------------------------


def top_documents(tbl, query: np.ndarray, column: str, k: int) -> list[tuple[str, float]]:
    """The k best documents for one query vector, each scored by its best chunk.

    Asks for k chunks first and widens the search until k distinct documents are found or the table
    is exhausted, so chunked tables still yield k documents. Exact without an ANN index.
    """
    limit = k
    while True:
        hits = (
            tbl.search(query, vector_column_name=column).distance_type("cosine").limit(limit)
            .select(["id"]).to_list()
        )
        docs = best_chunk_ranking((h["id"], 1.0 - h["_distance"]) for h in hits)
        if len(docs) >= k or len(hits) < limit:
            return docs[:k]
        limit *= 4


def evaluate_retrieval(
    db: str,
    table: str,
    queries: Mapping[str, str],
    qrels: Mapping[str, Mapping[str, int]],
    *,
    column: str | None = None,
    k_search: int = 100,
    storage_options: dict | None = None,
) -> dict:
    """nDCG@10, recall@100 and MRR@10 of a table written by the embed job, queries embedded as it says.

    Queries are embedded with the table's model and query task (table metadata), at the column's
    dimension; documents rank by their best chunk. Queries without relevant documents are skipped.
    """
    if k_search < max(k for _, k in RETRIEVAL_METRICS):
        raise ValueError(f"k_search must be >= {max(k for _, k in RETRIEVAL_METRICS)}, got {k_search}")
    side = open_for_queries(db, table, column, StorageConfig.from_env(storage_options))  # queries as the documents
    qids = [q for q in queries if _relevant(qrels.get(q, {}))]  # others are skipped: do not embed them
    if not qids:
        raise ValueError(f"none of the {len(queries)} queries has a relevant document in the qrels; do the query ids match?")
    vectors = side.embed([queries[q] for q in qids])
    run = {q: [doc for doc, _ in top_documents(side.table, v, side.column, k_search)]
           for q, v in zip(qids, vectors, strict=True)}
    scores = score_run(run, qrels)
    scores["skipped"] = len(queries) - len(qids)
    scores["qrels_without_query"] = sum(1 for q in qrels if q not in queries and _relevant(qrels[q]))
    return {**scores, "model": side.meta.model, "query_task": side.meta.query_task, "column": side.column, "table": table,
            "k_search": k_search}


# -- semantic textual similarity ------------------------------------------------------------------


def load_sts_pairs(path: str | Path, split_format: StsFormat = "stsbenchmark") -> tuple[list[str], list[str], list[float]]:
    """STS Benchmark file -> (sentences 1, sentences 2, gold scores).

    Tab-separated without header: fields[4] score, [5] sentence 1, [6] sentence 2 (some lines carry
    more fields after them). Split on tabs, not with csv: sentences contain unbalanced quotes.
    """
    if split_format not in get_args(StsFormat):
        raise ValueError(f"unknown STS format {split_format!r}; valid formats: {', '.join(get_args(StsFormat))}")
    left, right, scores = [], [], []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            fields = line.rstrip("\n").split("\t")
            if len(fields) < 7:
                raise ValueError(f"{path}:{n}: expected >= 7 tab-separated fields, got {len(fields)}")
            scores.append(float(fields[4]))
            left.append(fields[5])
            right.append(fields[6])
    return left, right, scores


def evaluate_sts(
    model_ref: str,
    pairs_path: str | Path,
    *,
    split_format: StsFormat = "stsbenchmark",
    task: str | None = None,
    precision: str = "auto",
    storage_options: dict | None = None,
) -> dict:
    """Spearman (and Pearson) of cosine similarity against gold scores, as MTEB's main STS score.

    `task` defaults to jina-v3's text-matching adapter when the model has one, else none.
    """
    left, right, gold = load_sts_pairs(pairs_path, split_format)
    storage = StorageConfig.from_env(storage_options)
    encoder = load_encoder(model_ref, dtype=precision, storage_options=storage.fsspec_options(model_ref))
    if task is None and STS_TASK in encoder.tasks:
        task = STS_TASK
    unique = list(dict.fromkeys(left + right))  # embed each sentence once
    vectors = encoder.encode(unique, task=task)
    index = {s: i for i, s in enumerate(unique)}
    a = vectors[[index[s] for s in left]]
    b = vectors[[index[s] for s in right]]
    cosine = (a * b).sum(axis=1)  # vectors are L2-normalized
    return {"spearman": spearman(cosine, gold), "pearson": pearson(cosine, gold), "pairs": len(gold),
            "sentences": len(unique), "model": encoder.info.identity, "task": task, "data": str(pairs_path),
            "dtype": encoder.precision}


__all__ = [
    "METRIC_FUNCTIONS",
    "Qrels",
    "RETRIEVAL_METRICS",
    "average_ranks",
    "best_chunk_ranking",
    "corpus_to_parquet",
    "evaluate_retrieval",
    "evaluate_sts",
    "load_corpus",
    "load_qrels",
    "load_queries",
    "load_sts_pairs",
    "mrr_at_k",
    "ndcg_at_k",
    "pearson",
    "recall_at_k",
    "score_run",
    "spearman",
    "top_documents",
]
