"""The two-phase Lance sink: FragmentWriter (workers) + LanceCommitter (driver), on real Ray, Lance and moto S3.

The committer's own semantics (whole-document windows, replacement, staging, resume) are in test_commit.py.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter

import lance
import lancedb
import numpy as np
import pyarrow as pa
import pytest

from pipeline.commit import LanceCommitter
from pipeline.sink import FragmentWriter, build_vector_indexes, read_table_metadata, table_uri, write_dataset
from pipeline.storage import StorageConfig
from pipeline.table_meta import TableMetadata

DIM, DIM16 = 32, 16
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("vector", pa.list_(pa.float32(), DIM)),
        ("vector_16", pa.list_(pa.float16(), DIM16)),
    ]
)
META = TableMetadata(run_id="run-test-1", job_key="job-1", state="running", model="tiny@0", model_ref="tiny",
                     model_family="test", task="retrieval.passage", query_task="retrieval.query", dims=(32, 16),
                     vector_dtype="float32", precision="float32", chunking={"mode": "none"})


def committer(uri: str, mode: str = "create", options: dict | None = None, meta: TableMetadata = META, **kw) -> LanceCommitter:
    return LanceCommitter(uri, SCHEMA, StorageConfig(options or {}), mode, meta, **kw)


def complete(meta: TableMetadata = META) -> TableMetadata:
    return dataclasses.replace(meta, state="complete")


def make_rows(n: int, start: int = 0, *, reject_every: int | None = None, seed: int = 0) -> pa.Table:
    """Data columns plus internal columns, as the pipeline hands them to the writer."""
    rng = np.random.default_rng(seed + start)
    ids = [f"doc-{i:06d}" for i in range(start, start + n)]
    vec = rng.standard_normal((n, DIM)).astype(np.float32)
    vec16 = rng.standard_normal((n, DIM16)).astype(np.float16)
    reasons = [("too_long" if reject_every and (start + i) % reject_every == 0 else None) for i in range(n)]
    return pa.table(
        {
            "id": ids,
            "text": [f"text {i}" for i in range(start, start + n)],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vec.ravel()), DIM),
            "vector_16": pa.FixedSizeListArray.from_arrays(pa.array(vec16.ravel()), DIM16),
            "_reject_reason": pa.array(reasons, pa.string()),
            "_tokens": pa.array([3] * n, pa.int32()),
            "_computed_tokens": pa.array([4] * n, pa.int64()),
            "_embed_s": pa.array([0.5] * n, pa.float64()),
            "_chunk_note": pa.array(["x"] * n, pa.string()),  # string internal: tallied value -> rows
        }
    )


def accepted(rows: pa.Table) -> pa.Table:
    return rows.filter(rows["_reject_reason"].is_null()).select(SCHEMA.names)


def read_sorted(uri: str, storage_options=None, version: int | None = None) -> pa.Table:
    ds = lance.dataset(uri, version=version, storage_options=storage_options)
    return ds.to_table().sort_by("id")


def blocks(table: pa.Table, size: int) -> list[pa.Table]:
    return [table.slice(i, size) for i in range(0, table.num_rows, size)]


# --- without Ray --------------------------------------------------------------------------------


def test_table_uri():
    assert table_uri("/data/db/", "emb") == "/data/db/emb.lance"
    assert table_uri("s3://bkt/pre/db", "emb-v2") == "s3://bkt/pre/db/emb-v2.lance"
    with pytest.raises(ValueError, match="invalid table name"):
        table_uri("/db", "a/b")


def test_fragment_writer_writes_accepted_rows_and_counts_the_rest(tmp_path):
    uri = table_uri(str(tmp_path), "t")
    c = committer(uri)
    c.begin()  # creates the empty table with its metadata: writers append to its schema
    rows = make_rows(40, reject_every=7)  # ids 0, 7, 14, ... rejected
    out = FragmentWriter(uri, SCHEMA, {})(rows)

    assert out.num_rows == 1
    row = out.to_pylist()[0]
    assert row["num_rows"] == 34
    assert json.loads(row["rejected"]) == {"too_long": 6}
    assert json.loads(row["reject_sample"]) == [{"id": f"doc-{i:06d}", "reason": "too_long"} for i in range(0, 40, 7)]
    assert json.loads(row["documents"]) == {"new": 34}
    assert json.loads(row["replace"]) == [] and json.loads(row["edges"]) == {}
    assert row["_tokens"] == 120 and row["_computed_tokens"] == 160 and row["_embed_s"] == pytest.approx(20.0)
    assert (
        out.schema.field("_tokens").type == pa.int64() and out.schema.field("_embed_s").type == pa.float64()
    )
    assert json.loads(row["_chunk_note"]) == {"x": 40} and "_reject_reason" not in out.column_names
    fragments = json.loads(row["fragments"])
    assert sum(f["physical_rows"] for f in fragments) == 34
    assert lance.dataset(uri).count_rows() == 0  # written but uncommitted: nothing visible

    c.add(out)
    summary = c.finish()
    assert summary.rows_committed == 34 and summary.commits == 1 and summary.rejected == {"too_long": 6}
    assert read_sorted(uri).equals(accepted(rows))
    assert read_table_metadata(uri, {}) == complete()


def test_fragment_writer_all_rejected_and_bad_batches(tmp_path):
    uri = table_uri(str(tmp_path), "t")
    committer(uri).begin()
    writer = FragmentWriter(uri, SCHEMA, {})
    rows = make_rows(5, reject_every=1)
    row = writer(rows).to_pylist()[0]
    assert row["num_rows"] == 0 and json.loads(row["fragments"]) == []
    assert json.loads(row["rejected"]) == {"too_long": 5}

    with pytest.raises(ValueError, match="unexpected non-internal columns \\['extra'\\]"):
        writer(rows.append_column("extra", pa.array([1] * 5)))
    with pytest.raises(ValueError, match="missing columns \\['vector_16'\\]"):
        writer(rows.drop_columns(["vector_16"]))


def test_fragment_writer_reports_documents_split_across_batches(tmp_path):
    uri = table_uri(str(tmp_path), "t")
    committer(uri).begin()
    rows = make_rows(6).append_column("_doc_chunks", pa.array([1, 3, 3, 3, 2, 2], pa.int32()))
    rows = rows.set_column(0, "id", pa.array(["a", "b", "b", "b", "c", "c"]))
    out = FragmentWriter(uri, SCHEMA, {})(rows.slice(0, 3)).to_pylist()[0]
    assert json.loads(out["edges"]) == {"b": [2, 3]}  # "a" is whole, "b" continues in the next batch
    out = FragmentWriter(uri, SCHEMA, {})(rows.slice(3, 2)).to_pylist()[0]
    assert json.loads(out["edges"]) == {"b": [1, 3], "c": [1, 2]}


# --- with Ray, local table ----------------------------------------------------------------------

N, BLOCK, REJECT_EVERY, WINDOW = 3000, 250, 250, 1000


@pytest.fixture(scope="module")
def written(ray_local, tmp_path_factory):
    """3000 rows in 12 blocks, one reject per block, committed in windows of >= 1000 rows."""
    db = str(tmp_path_factory.mktemp("lancedb"))
    uri = table_uri(db, "emb")
    rows = make_rows(N, reject_every=REJECT_EVERY)
    c = committer(uri, commit_every_rows=WINDOW, commit_every_s=3600)
    c.begin()
    summary = write_dataset(ray_local.data.from_arrow(blocks(rows, BLOCK)), c)
    return db, uri, rows, summary


def test_write_dataset_rows_exact_and_typed(written):
    db, uri, rows, summary = written
    per_block = BLOCK - 1
    assert summary.rows_committed == N - N // REJECT_EVERY == 12 * per_block
    assert summary.fragments_committed == 12
    assert summary.rejected == {"too_long": N // REJECT_EVERY}
    assert sorted(r["id"] for r in summary.reject_sample) == [f"doc-{i:06d}" for i in range(0, N, REJECT_EVERY)]
    assert summary.stats == {"_tokens": 3 * N, "_computed_tokens": 4 * N, "_embed_s": pytest.approx(0.5 * N)}

    tbl = lancedb.connect(db).open_table("emb")
    assert tbl.count_rows() == summary.rows_committed
    assert tbl.schema.field("vector").type == pa.list_(pa.float32(), DIM)
    assert tbl.schema.field("vector_16").type == pa.list_(pa.float16(), DIM16)
    got = tbl.to_arrow().sort_by("id")
    assert max(Counter(got["id"].to_pylist()).values()) == 1
    assert got.equals(accepted(rows))
    assert read_table_metadata(uri, {}) == complete()


def test_windowed_commits_are_whole_and_monotone(written):
    _, uri, _, summary = written
    per_block = BLOCK - 1
    # Version 1 is the empty table, 2 its metadata; 5 blocks (1245 rows) fill each of the first two
    # windows; the last 2 blocks commit in finish(), then the "complete" metadata.
    assert summary.commits == 3 and summary.versions == (3, 4, 5)
    counts = [lance.dataset(uri, version=v).count_rows() for v in summary.versions]
    assert counts == [5 * per_block, 10 * per_block, 12 * per_block]
    assert summary.version == 6
    ds = lance.dataset(uri)
    props = [ds.read_transaction(v).transaction_properties for v in range(2, 7)]
    assert all(p["embedlake.run_id"] == "run-test-1" and p["embedlake.kind"] == "create" for p in props), props
    assert [p["embedlake.what"] for p in props] == ["metadata", "window", "window", "window", "complete"]
    assert [int(p["embedlake.rows"]) for p in props[1:4]] == counts[:1] + [5 * per_block, 2 * per_block]


def test_build_vector_indexes_and_self_query(written):
    db, _, rows, _ = written
    built = build_vector_indexes(db, "emb", ["vector", "vector_16"], {})
    assert built == {"vector": "IvfFlat", "vector_16": "IvfFlat"}
    tbl = lancedb.connect(db).open_table("emb")
    assert {i.columns[0] for i in tbl.list_indices()} == {"vector", "vector_16"}
    sample = accepted(rows).take([1, 500, 2900]).to_pylist()
    for row in sample:
        for column in ("vector", "vector_16"):
            hit = tbl.search(row[column], vector_column_name=column).limit(3).to_list()
            assert hit[0]["id"] == row["id"], (column, row["id"], [h["id"] for h in hit])
    with pytest.raises(ValueError, match="not a vector column"):
        build_vector_indexes(db, "emb", ["text"], {})


def test_crash_mid_write_leaves_only_whole_windows(ray_local, tmp_path):
    uri = table_uri(str(tmp_path), "t")
    seed = make_rows(10, start=100_000)
    seeder = committer(uri)
    seeder.begin()
    seeder.add(FragmentWriter(uri, SCHEMA, {})(seed))
    seeder.finish()
    seeded = lance.dataset(uri).version

    def fail_on_last_block(batch: pa.Table) -> pa.Table:
        # Defined inside the test so cloudpickle ships it by value: Ray workers cannot import test modules.
        if "doc-000950" in batch["id"].to_pylist():
            deadline = time.monotonic() + 30
            while lance.dataset(uri).version <= seeded and time.monotonic() < deadline:
                time.sleep(0.05)  # crash only after at least one window was committed
            raise RuntimeError("injected failure")
        return batch

    rows = make_rows(1000)
    ds = ray_local.data.from_arrow(blocks(rows, 100)).map_batches(fail_on_last_block, batch_format="pyarrow")
    c = committer(uri, "append", meta=dataclasses.replace(META, run_id="run-2"), commit_every_rows=100, commit_every_s=3600)
    c.begin()
    with pytest.raises(Exception, match="injected failure"):
        write_dataset(ds, c)

    got = read_sorted(uri)  # still readable
    assert got.num_rows == 10 + c.rows_committed
    assert c.rows_committed % 100 == 0 and 100 <= c.rows_committed < 1000
    assert max(Counter(got["id"].to_pylist()).values()) == 1
    source = {r["id"]: r for r in accepted(pa.concat_tables([seed, rows])).to_pylist()}
    assert all(source[r["id"]] == r for r in got.to_pylist())
    for version in c.versions:  # every visible version holds whole windows
        assert (lance.dataset(uri, version=version).count_rows() - 10) % 100 == 0


# --- with Ray, S3 (moto) ------------------------------------------------------------------------


def test_write_dataset_to_s3_and_read_back_with_lancedb(ray_local, moto_s3):
    db = moto_s3.url("sink-test", "db")
    options = moto_s3.storage_options
    uri = table_uri(db, "emb")
    rows = make_rows(600, reject_every=100)
    c = committer(uri, options=options, commit_every_rows=300)
    c.begin()
    summary = write_dataset(ray_local.data.from_arrow(blocks(rows, 200)), c)
    assert summary.rows_committed == 594 and summary.commits == 2

    tbl = lancedb.connect(db, storage_options=options).open_table("emb")
    assert tbl.count_rows() == 594
    assert tbl.to_arrow().sort_by("id").equals(accepted(rows))
    assert read_table_metadata(uri, options) == complete()


def test_a_multivector_column_is_indexed_under_cosine_and_found_by_its_own_tokens(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.normal(size=(rng.integers(3, 9), 128)).astype(np.float32) for _ in range(40)]
    docs = [d / np.linalg.norm(d, axis=1, keepdims=True) for d in docs]
    column = pa.array([d.tolist() for d in docs], pa.list_(pa.list_(pa.float16(), 128)))
    db = str(tmp_path)
    lancedb.connect(db).create_table("mv", pa.table({"id": [f"d{i}" for i in range(40)], "multivector_128": column}))
    # The table's own distance setting does not reach a multivector column: Lance indexes those under cosine only.
    assert build_vector_indexes(db, "mv", ["multivector_128"], {}, distance_type="l2") == {"multivector_128": "IvfFlat"}
    tbl = lancedb.connect(db).open_table("mv")
    for i in (0, 17, 39):
        hit = tbl.search(docs[i][:2], vector_column_name="multivector_128").limit(1).to_list()
        assert hit[0]["id"] == f"d{i}"
