"""The embed job end to end on a real local Ray: Parquet shards -> encoder actors -> LanceDB.

Real everything: MiniLM from its package, a tiny random jina-v3 checkpoint, moto's S3 server,
LanceDB tables. Jobs are module-scoped fixtures where several tests check one run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import shutil
import uuid
from pathlib import Path

import lancedb
import numpy as np
import pyarrow as pa
import pytest
import torch
from shared_data import minilm_dir, qmsum_transcripts, sts_sentences

from model import Encoder, chunk_spans, load_encoder
from pipeline.config import ChunkingConfig, EncodeConfig, JobConfig, SinkConfig, SourceConfig
from pipeline.query import search
from pipeline.run import run_job
from pipeline.sink import read_table_metadata, table_uri
from pipeline.storage import StorageConfig

DIMS = (384, 128, 32)
KEEP = ("lang", "n")
COSINE_MIN = 0.99999
ATOL = 1e-5


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    return load_encoder(str(minilm_dir()), device="cpu", dtype=torch.float32)


def read_rows(db: str, table: str, storage_options: dict | None = None) -> pa.Table:
    tbl = lancedb.connect(db, storage_options=storage_options or {}).open_table(table)
    return tbl.to_arrow().sort_by([("id", "ascending"), ("chunk", "ascending")])


def vectors(rows: pa.Table, dim: int) -> np.ndarray:
    return np.stack(rows[f"vector_{dim}"].to_numpy(zero_copy_only=False)).astype(np.float32)


def assert_same_direction(got: np.ndarray, want: np.ndarray) -> None:
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    cos = (got * want).sum(1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= COSINE_MIN, (cos.min(), int(cos.argmin()))


def good_docs(tables: list[pa.Table]) -> dict[str, pa.Table]:
    whole = pa.concat_tables(tables).to_pylist()
    return {r["id"]: r for r in whole if r["id"] is not None and r["text"] is not None and r["text"].strip()}


# --------------------------------------------------------------------------------------------------
# local -> local, MiniLM, no chunking (one job, several tests)
# --------------------------------------------------------------------------------------------------

BAD_ROWS = [  # id, text, reason
    (None, "a document without an id", "missing id"),
    ("bad-null-text", None, "missing text"),
    ("bad-blank-text", "   \n\t ", "empty text"),
]


@pytest.fixture(scope="module")
def local_job(ray_up, tmp_path_factory, make_shards, write_shards):
    root = tmp_path_factory.mktemp("local_job")
    texts = sts_sentences(60)
    ids: list = [f"doc-{i:03d}" for i in range(60)]
    for pos, (bad_id, bad_text, _) in zip((5, 27, 48), BAD_ROWS, strict=True):
        ids.insert(pos, bad_id)
        texts.insert(pos, bad_text)
    shards = write_shards(root / "in", make_shards(texts, shards=3, ids=ids))
    cfg = JobConfig(
        source=SourceConfig(input=str(root / "in"), keep_columns=KEEP),
        encode=EncodeConfig(model=str(minilm_dir()), dims=DIMS, actors=1, precision="float32"),
        sink=SinkConfig(db=str(root / "db"), table="docs", index=True),
    )
    report = run_job(cfg)
    return cfg, report, shards, read_rows(cfg.sink.db, "docs")


def test_local_rows_are_documents_with_ids_and_kept_columns(local_job, minilm):
    cfg, report, shards, rows = local_job
    docs = good_docs(shards)
    assert len(docs) == 60
    assert rows.num_rows == 60
    assert rows["id"].to_pylist() == sorted(docs)
    assert set(rows["chunk"].to_pylist()) == {0}
    for r in rows.select(["id", "start", "end", "text", "content_hash", "model", *KEEP]).to_pylist():
        doc = docs[r["id"]]
        assert r["text"] == doc["text"] and (r["start"], r["end"]) == (0, len(doc["text"]))
        assert r["content_hash"] == hashlib.sha256(doc["text"].encode("utf-8")).hexdigest()
        assert (r["lang"], r["n"]) == (doc["lang"], doc["n"])
        assert r["model"] == minilm.info.identity
    schema = rows.schema
    assert schema.field("lang").type == pa.string() and schema.field("n").type == pa.int64()
    assert not [n for n in schema.names if n.startswith("_")]


def test_local_vectors_equal_direct_encoding_at_every_dim(local_job, minilm):
    _, _, _, rows = local_job
    texts = rows["text"].to_pylist()
    full = minilm.encode(texts, normalize=False)
    for d in DIMS:
        assert rows.schema.field(f"vector_{d}").type == pa.list_(pa.float32(), d)
        got = vectors(rows, d)
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalized at d
        assert_same_direction(got, full[:, :d])
        # encode(texts, dim=d) is this truncation + normalization of the same forward pass
        np.testing.assert_allclose(got, Encoder.finalize(full, d, normalize=True), atol=ATOL)
    np.testing.assert_allclose(vectors(rows, 128)[:8], minilm.encode(texts[:8], dim=128), atol=ATOL)


def test_local_table_metadata(local_job, minilm):
    cfg, report, _, _ = local_job
    meta = read_table_metadata(table_uri(cfg.sink.db, cfg.sink.table), {})
    assert meta.model == minilm.info.identity == report["model"]
    assert meta.model_ref == cfg.encode.model
    assert meta.task is None  # MiniLM has no tasks
    assert meta.dims == (384, 128, 32)
    assert meta.run_id == cfg.run_id == report["run_id"]
    assert meta.state == "complete" and meta.precision == "float32"
    chunking = meta.chunking
    assert (
        chunking["mode"] == "none" and chunking["late"] is False and chunking["window"] == minilm.max_length
    )


def test_local_report_reconciles_and_lists_rejects(local_job):
    cfg, report, _, rows = local_job
    assert report["documents_read"] == 63
    assert report["documents_read"] == report["documents_embedded"] + report["documents_rejected"]
    assert report["documents_embedded"] == 60 and report["documents_rejected"] == 3
    assert report["chunks_written"] == rows.num_rows == 60
    assert report["documents_truncated"] == 0
    assert sorted((r["id"] or "", r["reason"]) for r in report["rejected_sample"]) == sorted(
        (i or "", reason) for i, _, reason in BAD_ROWS
    )
    assert report["rejected_by_reason"] == {"missing id": 1, "missing text": 1, "empty text": 1}
    assert report["tokens"] > 0 and report["computed_tokens"] >= report["tokens"]
    assert sum(report["actors"].values()) == 63  # every row, rejected ones too, passed one actor
    assert len(report["actors"]) == 1
    # The report is stored beside the table, not inside the Lance directory.
    path = Path(report["report_path"])
    assert path == Path(cfg.sink.db) / "docs.reports" / f"{cfg.run_id}.json"
    stored = json.loads(path.read_text())
    assert stored == {k: v for k, v in report.items() if k != "report_path"}


def test_local_index_per_vector_column_and_search_finds_the_document(local_job):
    cfg, report, _, rows = local_job
    tbl = lancedb.connect(cfg.sink.db).open_table("docs")
    indexed = {tuple(i.columns) for i in tbl.list_indices()}
    assert indexed == {(f"vector_{d}",) for d in DIMS} | {("id",)}  # id: BTREE for re-embed lookups
    assert set(report["indexes"]) == {f"vector_{d}" for d in DIMS}
    for r in rows.select(["id", "text"]).to_pylist()[::12]:
        hits = search(cfg.sink.db, "docs", r["text"], k=3)
        assert hits[0]["id"] == r["id"] and hits[0]["score"] > 0.999, hits
        small = search(cfg.sink.db, "docs", r["text"], column="vector_32", k=3)
        assert small[0]["id"] == r["id"], small


# --------------------------------------------------------------------------------------------------
# modes and two actors (the two-actor table is the starting point of the mode test)
# --------------------------------------------------------------------------------------------------


TWO_ACTOR_DOCS = 64


@pytest.fixture(scope="module")
def two_actor_job(ray_up, tmp_path_factory, passages, make_shards, write_shards, spread_over_actors):
    root = tmp_path_factory.mktemp("two_actors")
    shards = write_shards(root / "in", make_shards(passages(TWO_ACTOR_DOCS), shards=4))
    cfg = JobConfig(
        source=SourceConfig(input=str(root / "in"), keep_columns=KEEP),
        # sort_window = documents per actor call: 8 passages, ~0.3 s (see spread_over_actors).
        encode=EncodeConfig(model=str(minilm_dir()), dims=(384, 64), actors=2, sort_window=8, precision="float32"),
        sink=SinkConfig(db=str(root / "db"), table="docs"),
    )
    with spread_over_actors():
        report = run_job(cfg)
    return cfg, report, shards, read_rows(cfg.sink.db, "docs")


def test_two_actors_no_duplicates_no_losses(two_actor_job, minilm):
    cfg, report, shards, rows = two_actor_job
    docs = good_docs(shards)
    pairs = list(zip(rows["id"].to_pylist(), rows["chunk"].to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) == TWO_ACTOR_DOCS
    assert {i for i, _ in pairs} == set(docs)
    assert [docs[i]["text"] for i in rows["id"].to_pylist()] == rows["text"].to_pylist()
    assert report["chunks_written"] == report["documents_read"] == TWO_ACTOR_DOCS
    assert len(report["actors"]) == 2, report["actors"]  # both actors embedded rows
    assert sum(report["actors"].values()) == TWO_ACTOR_DOCS
    assert len({a.split(" pid=")[1].split()[0] for a in report["actors"]}) == 2  # two processes
    texts = rows["text"].to_pylist()
    full = minilm.encode(texts)
    np.testing.assert_allclose(vectors(rows, 384), full, atol=ATOL)
    np.testing.assert_allclose(vectors(rows, 64), Encoder.finalize(full, 64, normalize=True), atol=ATOL)


def test_modes_create_fails_append_adds_overwrite_replaces(
    two_actor_job, ray_up, tmp_path, make_shards, write_shards
):
    base, _, _, base_rows = two_actor_job
    db = str(tmp_path / "db")
    shutil.copytree(table_uri(base.sink.db, "docs"), table_uri(db, "docs"))  # a Lance table is its directory
    uri = table_uri(db, "docs")
    version = lancedb.connect(db).open_table("docs").version

    def job(name: str, texts: list[str], mode: str) -> JobConfig:
        write_shards(
            tmp_path / name, make_shards(texts, shards=2, ids=[f"{name}-{i}" for i in range(len(texts))])
        )
        return dataclasses.replace(
            base,
            source=dataclasses.replace(base.source, input=str(tmp_path / name)),
            encode=dataclasses.replace(base.encode, actors=1),
            sink=dataclasses.replace(base.sink, db=db, mode=mode),
            run_id=uuid.uuid4().hex[:12],
        )

    with pytest.raises(FileExistsError, match=r"already exists.*reembed.*--mode overwrite"):
        run_job(job("create", sts_sentences(4), "create"))
    tbl = lancedb.connect(db).open_table("docs")
    assert tbl.version == version and tbl.count_rows() == TWO_ACTOR_DOCS  # untouched

    appended = job("app", sts_sentences(10), "append")
    report = run_job(appended)
    rows = read_rows(db, "docs")
    assert report["chunks_written"] == 10 and rows.num_rows == TWO_ACTOR_DOCS + 10
    assert sorted(rows["id"].to_pylist()) == sorted(
        base_rows["id"].to_pylist() + [f"app-{i}" for i in range(10)]
    )
    assert read_table_metadata(uri, {}).run_id == appended.run_id

    overwrite = job("new", sts_sentences(20)[10:], "overwrite")
    report = run_job(overwrite)
    rows = read_rows(db, "docs")
    assert report["chunks_written"] == 10 and rows.num_rows == 10
    assert rows["id"].to_pylist() == sorted(f"new-{i}" for i in range(10))
    assert rows["text"].to_pylist() == [sts_sentences(20)[10 + int(i[4:])] for i in rows["id"].to_pylist()]
    meta = read_table_metadata(uri, {})
    assert meta.run_id == overwrite.run_id and meta.dims == (384, 64)
    reports = sorted(p.name for p in (tmp_path / "db" / "docs.reports").iterdir())
    assert reports == sorted(f"{c.run_id}.json" for c in (appended, overwrite))


# --------------------------------------------------------------------------------------------------
# S3 -> S3 against moto
# --------------------------------------------------------------------------------------------------


def test_s3_to_s3(s3_env, ray_up, make_shards, write_shards, minilm):
    storage = StorageConfig.from_env()  # the AWS_* variables s3_env set
    prefix = f"s3job-{uuid.uuid4().hex[:8]}"
    input_url = s3_env.url(prefix, "in")
    shards = write_shards(
        input_url, make_shards(sts_sentences(24), shards=3), filesystem=storage.pyarrow_filesystem(input_url)
    )
    db = s3_env.url(prefix, "db")
    cfg = JobConfig(  # no storage_options: the job resolves them from the environment
        source=SourceConfig(input=input_url, keep_columns=KEEP),
        encode=EncodeConfig(model=str(minilm_dir()), dims=(384, 32), actors=1, precision="float32"),
        sink=SinkConfig(db=db, table="docs"),
    )
    report = run_job(cfg)

    rows = read_rows(db, "docs", s3_env.storage_options)
    docs = good_docs(shards)
    assert rows.num_rows == report["chunks_written"] == 24 and rows["id"].to_pylist() == sorted(docs)
    assert [docs[i]["lang"] for i in rows["id"].to_pylist()] == rows["lang"].to_pylist()
    np.testing.assert_allclose(vectors(rows, 384), minilm.encode(rows["text"].to_pylist()), atol=ATOL)
    np.testing.assert_allclose(vectors(rows, 32), minilm.encode(rows["text"].to_pylist(), dim=32), atol=ATOL)
    meta = read_table_metadata(table_uri(db, "docs"), s3_env.storage_options)
    assert meta.run_id == cfg.run_id and meta.dims == (384, 32)
    assert report["report_path"] == f"{db}/docs.reports/{cfg.run_id}.json"
    fs = storage.fsspec_filesystem(db)
    stored = json.loads(fs.cat(report["report_path"].removeprefix("s3://")))
    assert stored["run_id"] == cfg.run_id and stored["chunks_written"] == 24
    assert "testing" not in json.dumps(stored)  # no credentials in the report


# --------------------------------------------------------------------------------------------------
# chunking: late (tiny jina-v3, long document) and naive (MiniLM)
# --------------------------------------------------------------------------------------------------

LATE_WINDOW = 128
CHUNK_TOKENS = 24


def _multi_sentence_docs(n: int, per: int, start: int = 0) -> list[str]:
    sents = sts_sentences(start + n * per)[start:]
    return [" ".join(sents[i * per : (i + 1) * per]) for i in range(n)]


@pytest.fixture(scope="module")
def late_job(ray_up, tmp_path_factory, make_shards, write_shards, tiny_jina_model):
    root = tmp_path_factory.mktemp("late_job")
    texts = _multi_sentence_docs(14, 4) + [qmsum_transcripts(limit=1)[0][:4000]]
    shards = write_shards(root / "in", make_shards(texts, shards=3))
    cfg = JobConfig(
        source=SourceConfig(input=str(root / "in")),
        encode=EncodeConfig(model=str(tiny_jina_model), actors=1, precision="float32"),
        chunking=ChunkingConfig(mode="fixed", chunk_tokens=CHUNK_TOKENS, late=True, max_length=LATE_WINDOW),
        sink=SinkConfig(db=str(root / "db"), table="chunks"),
    )
    report = run_job(cfg)
    return cfg, report, shards, read_rows(cfg.sink.db, "chunks")


def test_late_chunking_vectors_equal_encode_spans(late_job, tiny_jina_model):
    cfg, report, shards, rows = late_job
    enc = load_encoder(str(tiny_jina_model), device="cpu", dtype=torch.float32)
    assert report["task"] == "retrieval.passage" and report["chunking"] == {
        "mode": "fixed",
        "late": True,
        "window": LATE_WINDOW,
    }
    meta = read_table_metadata(table_uri(cfg.sink.db, "chunks"), {})
    assert meta.task == "retrieval.passage" and meta.chunking["late"] is True
    docs = good_docs(shards)
    by_id: dict[str, list[dict]] = {}
    for r in rows.to_pylist():
        by_id.setdefault(r["id"], []).append(r)
    assert set(by_id) == set(docs)
    assert report["documents_embedded"] == len(docs) and report["chunks_written"] == rows.num_rows
    long_id = max(docs, key=lambda i: len(docs[i]["text"]))
    n_tokens = len(
        enc.tokenizer.encode_with_offsets(
            [docs[long_id]["text"]], [enc.tokenizer.prefix("retrieval.passage")]
        )[0].ids
    )
    assert n_tokens > 3 * LATE_WINDOW  # several windows: long late chunking is exercised

    naive_differs = 0
    for doc_id, chunks in by_id.items():
        text = docs[doc_id]["text"]
        assert [c["chunk"] for c in chunks] == list(range(len(chunks)))
        spans = [(c["start"], c["end"]) for c in chunks]
        # every chunk of the chunker is there, so every chunk got a vector
        assert spans == chunk_spans(enc.tokenizer, text, "fixed", chunk_tokens=CHUNK_TOKENS)
        for c in chunks:
            assert c["text"] == text[c["start"] : c["end"]] and c["text"]
        assert all(a[0] < b[0] and a[1] <= b[1] for a, b in itertools.pairwise(spans))  # text order
        got = np.stack([c["vector_32"] for c in chunks]).astype(np.float32)
        assert np.isfinite(got).all()
        want = enc.encode_spans([text], [spans], task="retrieval.passage", window=LATE_WINDOW)[0]
        np.testing.assert_allclose(got, want, atol=ATOL, err_msg=doc_id)
        naive = enc.encode([c["text"] for c in chunks], task="retrieval.passage")
        naive_differs += int(not np.allclose(got, naive, atol=1e-3))
    assert len(by_id[long_id]) > 20  # the long document's chunks span all its windows
    assert naive_differs == len(by_id)  # late chunking saw the context


def test_late_chunk_spans_do_not_overlap(late_job):
    _, _, _, rows = late_job
    by_id: dict[str, list[tuple[int, int]]] = {}
    for r in rows.select(["id", "start", "end"]).to_pylist():
        by_id.setdefault(r["id"], []).append((r["start"], r["end"]))
    overlaps = [(i, a, b) for i, s in by_id.items() for a, b in itertools.pairwise(s) if a[1] > b[0]]
    assert not overlaps, overlaps[:5]


def test_naive_chunking_vectors_equal_encode_of_chunk_text(
    ray_up, tmp_path, make_shards, write_shards, minilm
):
    texts = _multi_sentence_docs(12, 3, start=200)
    titles = [f"Title {i}." for i in range(12)]
    shards = write_shards(tmp_path / "in", make_shards(texts, shards=3, extra={"title": titles}))
    cfg = JobConfig(
        source=SourceConfig(input=str(tmp_path / "in"), title_column="title", keep_columns=("n",)),
        encode=EncodeConfig(model=str(minilm_dir()), actors=1, precision="float32"),
        chunking=ChunkingConfig(mode="sentences", chunk_sentences=1, late=False),
        sink=SinkConfig(db=str(tmp_path / "db"), table="chunks"),
    )
    report = run_job(cfg)
    rows = read_rows(cfg.sink.db, "chunks")
    docs = good_docs(shards)
    assert report["chunking"]["late"] is False
    assert report["documents_embedded"] == 12 and report["chunks_written"] == rows.num_rows >= 12 * 3
    by_id: dict[str, list[dict]] = {}
    for r in rows.to_pylist():
        by_id.setdefault(r["id"], []).append(r)
    assert set(by_id) == set(docs)
    for doc_id, chunks in by_id.items():
        embedded = f"{docs[doc_id]['title']} {docs[doc_id]['text']}"  # title + " " + text
        assert [c["chunk"] for c in chunks] == list(range(len(chunks)))
        for c in chunks:
            assert c["text"] == embedded[c["start"] : c["end"]]
            assert c["content_hash"] == hashlib.sha256(embedded.encode("utf-8")).hexdigest()
            assert c["n"] == docs[doc_id]["n"]
        assert chunks[0]["start"] == 0 and chunks[-1]["end"] == len(embedded)
    got = vectors(rows, 384)
    want = minilm.encode(rows["text"].to_pylist())
    assert_same_direction(got, want)
    np.testing.assert_allclose(got, want, atol=ATOL)
