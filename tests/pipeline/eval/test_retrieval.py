"""Evaluation metrics on hand-computed cases, best-chunk aggregation, BEIR/STS loaders.

Pure functions only (no encoder, no Ray): the end-to-end evaluations live in tests/jobs/test_eval.py.
"""

from __future__ import annotations

import json
import math

import lancedb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import scipy.stats

from pipeline.eval.retrieval import (
    average_ranks,
    best_chunk_ranking,
    corpus_to_parquet,
    load_qrels,
    load_queries,
    load_sts_pairs,
    mrr_at_k,
    ndcg_at_k,
    recall_at_k,
    score_run,
    spearman,
    top_documents,
)

EXACT = 1e-12  # float64 arithmetic on a handful of terms

# -- nDCG ------------------------------------------------------------------------------------------


def test_ndcg_graded_with_a_relevant_doc_never_retrieved():
    qrels = {"a": 2, "b": 1, "c": 1, "z": 0}  # "b" is relevant but not ranked; "z" is judged non-relevant
    got = ndcg_at_k(["x", "a", "z", "c"], qrels, k=10)
    dcg = 2 / math.log2(3) + 1 / math.log2(5)  # "a" at rank 2, "c" at rank 4
    idcg = 2 / math.log2(2) + 1 / math.log2(3) + 1 / math.log2(4)  # ideal: 2, 1, 1
    assert got == pytest.approx(dcg / idcg, abs=EXACT)
    assert got == pytest.approx(0.5406, abs=1e-4)  # 1.6925 / 3.1309


def test_ndcg_perfect_cutoff_and_ideal_limited_to_k():
    qrels = {"a": 3, "b": 2, "c": 1}
    assert ndcg_at_k(["a", "b", "c", "x"], qrels) == pytest.approx(1.0, abs=EXACT)
    assert ndcg_at_k(["x", "y", "a"], qrels, k=2) == 0.0  # the hit lies beyond k
    # k=1: the ideal holds only the best document, so ranking "b" first scores 2/3.
    assert ndcg_at_k(["b", "a"], qrels, k=1) == pytest.approx(2 / 3, abs=EXACT)
    assert ndcg_at_k(["a"], {"a": 0}) == 0.0  # no relevant document at all


def test_metrics_reject_repeated_documents_and_bad_k():
    with pytest.raises(ValueError, match="repeats a document"):
        ndcg_at_k(["a", "a"], {"a": 1})
    with pytest.raises(ValueError, match="k must be >= 1"):
        recall_at_k(["a"], {"a": 1}, k=0)


# -- recall and MRR --------------------------------------------------------------------------------


def test_recall_divides_by_all_relevant_documents():
    qrels = {"a": 1, "b": 2, "c": 1, "d": 1, "n": 0}
    assert recall_at_k(["a", "x", "n", "c", "b"], qrels, k=4) == pytest.approx(2 / 4, abs=EXACT)
    assert recall_at_k(["a", "x", "n", "c", "b"], qrels, k=100) == pytest.approx(3 / 4, abs=EXACT)
    assert recall_at_k([], qrels) == 0.0


def test_mrr_first_relevant_rank_and_no_hit_is_zero():
    qrels = {"b": 1, "c": 2}
    assert mrr_at_k(["x", "y", "c", "b"], qrels, k=10) == pytest.approx(1 / 3, abs=EXACT)
    assert mrr_at_k(["b"], qrels) == 1.0
    assert mrr_at_k(["x", "y", "z"], qrels) == 0.0
    assert mrr_at_k(["x", "y", "c"], qrels, k=2) == 0.0  # first hit beyond k
    assert mrr_at_k(["x", "n"], {"n": 0}) == 0.0  # judged non-relevant does not count


# -- aggregation -----------------------------------------------------------------------------------


def test_score_run_means_over_queries_with_relevant_docs_and_counts_skipped():
    qrels = {"q1": {"a": 1}, "q2": {"b": 2, "c": 1}, "q3": {"d": 0}}
    run = {"q1": ["a", "x"], "q2": ["x", "c"], "q3": ["d"], "q4": ["a"]}  # q3, q4: nothing relevant
    got = score_run(run, qrels, metrics=(("ndcg", 10), ("recall", 1), ("mrr", 10)))
    ndcg_q2 = (1 / math.log2(3)) / (2 + 1 / math.log2(3))
    assert got["ndcg@10"] == pytest.approx((1.0 + ndcg_q2) / 2, abs=EXACT)
    assert got["recall@1"] == pytest.approx((1.0 + 0.0) / 2, abs=EXACT)
    assert got["mrr@10"] == pytest.approx((1.0 + 0.5) / 2, abs=EXACT)
    assert (got["queries"], got["skipped"]) == (2, 2)
    with pytest.raises(ValueError, match="unknown metric 'map'"):
        score_run(run, qrels, metrics=(("map", 10),))


def test_best_chunk_ranking_keeps_each_documents_best_chunk():
    hits = [("d1", 0.20), ("d2", 0.90), ("d1", 0.95), ("d3", 0.50), ("d2", 0.10), ("d4", 0.50)]
    assert best_chunk_ranking(hits) == [("d1", 0.95), ("d2", 0.90), ("d3", 0.50), ("d4", 0.50)]
    assert best_chunk_ranking([]) == []


def test_top_documents_widens_the_search_until_k_documents(tmp_path):
    # Document "a" owns the 5 chunks nearest the query: the first 3 chunk hits name one document only.
    angles = {"a": [0.00, 0.01, 0.02, 0.03, 0.04], "b": [0.30, 0.90], "c": [0.50], "d": [1.20]}
    rows = [(doc, [math.cos(t), math.sin(t), 0.0, 0.0]) for doc, ts in angles.items() for t in ts]
    data = pa.table({"id": [d for d, _ in rows], "vector_4": pa.array([v for _, v in rows], pa.list_(pa.float32(), 4))})
    tbl = lancedb.connect(tmp_path / "db").create_table("t", data)
    got = top_documents(tbl, np.array([1.0, 0.0, 0.0, 0.0], np.float32), "vector_4", k=3)
    assert [doc for doc, _ in got] == ["a", "b", "c"]
    assert [score for _, score in got] == pytest.approx([1.0, math.cos(0.30), math.cos(0.50)], abs=1e-6)
    assert [doc for doc, _ in top_documents(tbl, np.array([1.0, 0.0, 0.0, 0.0], np.float32), "vector_4", k=10)] == [
        "a", "b", "c", "d"]  # fewer documents than k: all of them


# -- Spearman ----------------------------------------------------------------------------------------


def test_average_ranks_share_ties():
    np.testing.assert_array_equal(average_ranks([10, 20, 20, 30]), [1, 2.5, 2.5, 4])
    np.testing.assert_array_equal(average_ranks([3.0, 1.0, 3.0, 3.0, 0.5]), [4, 2, 4, 4, 1])


def test_spearman_hand_computed_with_ties():
    # ranks x = (1, 2.5, 2.5, 4), y = (1, 3, 2, 4): centered products 4.5, squares 4.5 and 5.
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5), abs=EXACT)
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0, abs=EXACT)  # monotone, not linear
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0, abs=EXACT)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # constant side: undefined
    with pytest.raises(ValueError, match="x has 2 values but y has 3"):
        spearman([1, 2], [1, 2, 3])


def test_spearman_matches_scipy_on_tied_data():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, size=200).astype(float)  # many ties, as gold STS scores have
    y = x + rng.normal(0, 2, size=200).round(1)
    assert spearman(x, y) == pytest.approx(scipy.stats.spearmanr(x, y).statistic, abs=1e-12)


# -- loaders ---------------------------------------------------------------------------------------


def test_beir_loaders_on_tiny_files(tmp_path):
    (tmp_path / "queries.jsonl").write_text(
        '{"_id": "q1", "text": "what is a cat?"}\n\n{"_id": 2, "text": "dogs", "metadata": {}}\n'
    )
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\nq1\td1\t2\nq1\td2\t0\n2\td3\t1\n")
    (tmp_path / "corpus.jsonl").write_text(
        json.dumps({"_id": "d1", "title": "Cats", "text": "A cat is a feline."}) + "\n"
        + json.dumps({"_id": "d2", "text": "No title here."}) + "\n"
    )
    assert load_queries(tmp_path / "queries.jsonl") == {"q1": "what is a cat?", "2": "dogs"}
    assert load_qrels(tmp_path / "qrels.tsv") == {"q1": {"d1": 2, "d2": 0}, "2": {"d3": 1}}
    assert corpus_to_parquet(tmp_path / "corpus.jsonl", tmp_path / "corpus.parquet") == 2
    table = pq.read_table(tmp_path / "corpus.parquet")
    assert table.to_pylist() == [
        {"id": "d1", "title": "Cats", "text": "A cat is a feline."},
        {"id": "d2", "title": "", "text": "No title here."},
    ]


def test_qrels_without_header_and_bad_lines(tmp_path):
    (tmp_path / "q.tsv").write_text("q1\td1\t1\n")
    assert load_qrels(tmp_path / "q.tsv") == {"q1": {"d1": 1}}
    (tmp_path / "bad.tsv").write_text("q1\td1\thigh\n")
    with pytest.raises(ValueError, match=r"bad.tsv:1: score 'high' is not an integer"):
        load_qrels(tmp_path / "bad.tsv")


def test_sts_loader_splits_on_tabs_not_csv(tmp_path):
    # An unbalanced quote would make a csv reader swallow the next line; extra trailing fields exist.
    path = tmp_path / "sts.csv"
    path.write_text(
        'main-news\tdeft\t2015\t0001\t4.200\t"He said so.\tHe said: "yes".\tsrc1\tsrc2\n'
        "main-captions\tMSRvid\t2012test\t0024\t2.500\tA girl is styling her hair.\tA girl is brushing her hair.\n"
    )
    left, right, scores = load_sts_pairs(path)
    assert left == ['"He said so.', "A girl is styling her hair."]
    assert right == ['He said: "yes".', "A girl is brushing her hair."]
    assert scores == [4.2, 2.5]
    with pytest.raises(ValueError, match="unknown STS format 'sick'; valid formats: stsbenchmark"):
        load_sts_pairs(path, "sick")
