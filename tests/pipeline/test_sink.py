"""The two-phase Lance sink: FragmentWriter (workers) + LanceCommitter (driver), on real Ray, Lance and moto S3."""

from __future__ import annotations

import json
import time
from collections import Counter

import lance
import lancedb
import numpy as np
import pyarrow as pa
import pytest

from pipeline.sink import (
    FragmentWriter,
    LanceCommitter,
    build_vector_indexes,
    read_table_metadata,
    table_uri,
    write_dataset,
)

DIM, DIM16 = 32, 16
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("vector", pa.list_(pa.float32(), DIM)),
        ("vector_16", pa.list_(pa.float16(), DIM16)),
    ]
)
META = {"run_id": "run-test-1", "model": "tiny", "task": "retrieval.passage", "dims": "32,16"}


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


def test_fragment_writer_writes_accepted_rows_and_reports_the_rest(tmp_path):
    uri = table_uri(str(tmp_path), "t")
    rows = make_rows(40, reject_every=7)  # ids 0, 7, 14, ... rejected
    out = FragmentWriter(uri, SCHEMA, {}, mode="create")(rows)

    assert out.num_rows == 1
    row = out.to_pylist()[0]
    assert row["num_rows"] == 34
    assert json.loads(row["rejects"]) == [
        {"id": f"doc-{i:06d}", "reason": "too_long"} for i in range(0, 40, 7)
    ]
    assert row["_tokens"] == 120 and row["_computed_tokens"] == 160 and row["_embed_s"] == pytest.approx(20.0)
    assert (
        out.schema.field("_tokens").type == pa.int64() and out.schema.field("_embed_s").type == pa.float64()
    )
    assert json.loads(row["_chunk_note"]) == {"x": 40} and "_reject_reason" not in out.column_names
    fragments = json.loads(row["fragments"])
    assert sum(f["physical_rows"] for f in fragments) == 34
    with pytest.raises(ValueError, match="not found"):
        lance.dataset(uri)  # written but uncommitted: nothing visible

    committer = LanceCommitter(uri, SCHEMA, {}, "create", metadata=META)
    committer.begin()
    committer.add(out)
    summary = committer.finish()
    assert summary.rows_committed == 34 and summary.commits == 1
    assert read_sorted(uri).equals(accepted(rows))
    assert read_table_metadata(uri, {}) == META


def test_fragment_writer_all_rejected_and_bad_batches(tmp_path):
    uri = table_uri(str(tmp_path), "t")
    writer = FragmentWriter(uri, SCHEMA, {})
    rows = make_rows(5, reject_every=1)
    row = writer(rows).to_pylist()[0]
    assert row["num_rows"] == 0 and json.loads(row["fragments"]) == []
    assert len(json.loads(row["rejects"])) == 5

    with pytest.raises(ValueError, match="unexpected non-internal columns \\['extra'\\]"):
        writer(rows.append_column("extra", pa.array([1] * 5)))
    with pytest.raises(ValueError, match="missing columns \\['vector_16'\\]"):
        writer(rows.drop_columns(["vector_16"]))
    with pytest.raises(ValueError, match="mode must be one of"):
        FragmentWriter(uri, SCHEMA, {}, mode="upsert")


def test_committer_modes_check_table_state(tmp_path):
    uri = table_uri(str(tmp_path), "t")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LanceCommitter(uri, SCHEMA, {}, "append").begin()
    with pytest.raises(RuntimeError, match="begin"):
        LanceCommitter(uri, SCHEMA, {}, "create").finish()

    empty = LanceCommitter(uri, SCHEMA, {}, "create")
    empty.begin()
    summary = empty.finish()  # create with no rows still makes the (empty) table
    assert lance.dataset(uri).count_rows() == 0 and summary.rows_committed == 0

    with pytest.raises(FileExistsError, match="already exists"):
        LanceCommitter(uri, SCHEMA, {}, "create").begin()
    other = pa.schema([("id", pa.string()), ("vector", pa.list_(pa.float32(), 8))])
    with pytest.raises(ValueError, match="schema differs"):
        LanceCommitter(uri, other, {}, "append").begin()
    with pytest.raises(TypeError, match="str to str"):
        LanceCommitter(uri, SCHEMA, {}, "append", metadata={"dims": 32})


# --- with Ray, local table ----------------------------------------------------------------------

N, BLOCK, REJECT_EVERY, WINDOW = 3000, 250, 250, 1000


@pytest.fixture(scope="module")
def written(ray_local, tmp_path_factory):
    """3000 rows in 12 blocks, one reject per block, committed in windows of >= 1000 rows."""
    db = str(tmp_path_factory.mktemp("lancedb"))
    uri = table_uri(db, "emb")
    rows = make_rows(N, reject_every=REJECT_EVERY)
    committer = LanceCommitter(
        uri, SCHEMA, {}, "create", commit_every_rows=WINDOW, commit_every_s=3600, metadata=META
    )
    summary = write_dataset(
        ray_local.data.from_arrow(blocks(rows, BLOCK)), committer, schema=SCHEMA, uri=uri, storage_options={}
    )
    return db, uri, rows, summary


def test_write_dataset_rows_exact_and_typed(written):
    db, uri, rows, summary = written
    per_block = BLOCK - 1
    assert summary.rows_committed == N - N // REJECT_EVERY == 12 * per_block
    assert summary.fragments_committed == 12
    assert sorted(r["id"] for r in summary.rejects) == [f"doc-{i:06d}" for i in range(0, N, REJECT_EVERY)]
    assert summary.stats == {"_tokens": 3 * N, "_computed_tokens": 4 * N, "_embed_s": pytest.approx(0.5 * N)}

    tbl = lancedb.connect(db).open_table("emb")
    assert tbl.count_rows() == summary.rows_committed
    assert tbl.schema.field("vector").type == pa.list_(pa.float32(), DIM)
    assert tbl.schema.field("vector_16").type == pa.list_(pa.float16(), DIM16)
    got = tbl.to_arrow().sort_by("id")
    assert max(Counter(got["id"].to_pylist()).values()) == 1
    assert got.equals(accepted(rows))
    assert read_table_metadata(uri, {}) == META


def test_windowed_commits_are_whole_and_monotone(written):
    _, uri, _, summary = written
    per_block = BLOCK - 1
    # 5 blocks (1245 rows) fill the first two windows; the last 2 blocks commit in finish().
    assert summary.commits == 3 and summary.versions == (1, 2, 3)
    counts = [lance.dataset(uri, version=v).count_rows() for v in summary.versions]
    assert counts == [5 * per_block, 10 * per_block, 12 * per_block]
    assert summary.version == 4  # + the metadata commit
    ds = lance.dataset(uri)
    messages = [ds.read_transaction(v).transaction_properties["__lance_commit_message"] for v in range(1, 5)]
    assert all("run=run-test-1" in m for m in messages), messages


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


def test_append_and_overwrite_modes(ray_local, tmp_path):
    uri = table_uri(str(tmp_path), "t")
    first, second, third = make_rows(300), make_rows(200, start=300), make_rows(150, start=1000)

    def run(rows, mode, **kwargs):
        committer = LanceCommitter(uri, SCHEMA, {}, mode, commit_every_s=3600, **kwargs)
        return write_dataset(ray_local.data.from_arrow(blocks(rows, 50)), committer)

    run(first, "create", metadata={"model": "a", "note": "old"})
    with pytest.raises(FileExistsError):
        run(first, "create")

    summary = run(second, "append", metadata={"model": "b"})
    assert read_sorted(uri).equals(accepted(pa.concat_tables([first, second])))
    assert read_table_metadata(uri, {}) == {"model": "b", "note": "old"}  # append merges keys
    assert summary.commits == 1

    before = lance.dataset(uri).version
    summary = run(third, "overwrite", commit_every_rows=10, metadata={"model": "c"})
    # A single Overwrite commit despite a window of 10 rows, then the metadata commit.
    assert summary.commits == 1 and summary.versions == (before + 1,) and summary.version == before + 2
    assert read_sorted(uri).equals(accepted(third))
    assert read_table_metadata(uri, {}) == {"model": "c"}  # overwrite replaces stale keys


def test_crash_mid_write_leaves_only_whole_windows(ray_local, tmp_path):
    uri = table_uri(str(tmp_path), "t")
    seed = make_rows(10, start=100_000)
    seeder = LanceCommitter(uri, SCHEMA, {}, "create")
    seeder.begin()
    seeder.add(FragmentWriter(uri, SCHEMA, {}, mode="create")(seed))
    seeder.finish()

    def fail_on_last_block(batch: pa.Table) -> pa.Table:
        # Defined inside the test so cloudpickle ships it by value: Ray workers cannot import test modules.
        if "doc-000950" in batch["id"].to_pylist():
            deadline = time.monotonic() + 30
            while lance.dataset(uri).version < 2 and time.monotonic() < deadline:
                time.sleep(0.05)  # crash only after at least one window was committed
            raise RuntimeError("injected failure")
        return batch

    rows = make_rows(1000)
    ds = ray_local.data.from_arrow(blocks(rows, 100)).map_batches(fail_on_last_block, batch_format="pyarrow")
    committer = LanceCommitter(uri, SCHEMA, {}, "append", commit_every_rows=100, commit_every_s=3600)
    with pytest.raises(Exception, match="injected failure"):
        write_dataset(ds, committer)

    got = read_sorted(uri)  # still readable
    assert got.num_rows == 10 + committer.rows_committed
    assert committer.rows_committed % 100 == 0 and 100 <= committer.rows_committed < 1000
    assert max(Counter(got["id"].to_pylist()).values()) == 1
    source = {r["id"]: r for r in accepted(pa.concat_tables([seed, rows])).to_pylist()}
    assert all(source[r["id"]] == r for r in got.to_pylist())
    for version in committer.versions:  # every visible version holds whole windows
        assert (lance.dataset(uri, version=version).count_rows() - 10) % 100 == 0


# --- with Ray, S3 (moto) ------------------------------------------------------------------------


def test_write_dataset_to_s3_and_read_back_with_lancedb(ray_local, moto_s3):
    db = moto_s3.url("sink-test", "db")
    options = moto_s3.storage_options
    uri = table_uri(db, "emb")
    rows = make_rows(600, reject_every=100)
    committer = LanceCommitter(uri, SCHEMA, options, "create", commit_every_rows=300, metadata=META)
    summary = write_dataset(ray_local.data.from_arrow(blocks(rows, 200)), committer)
    assert summary.rows_committed == 594 and summary.commits == 2

    tbl = lancedb.connect(db, storage_options=options).open_table("emb")
    assert tbl.count_rows() == 594
    assert tbl.to_arrow().sort_by("id").equals(accepted(rows))
    assert read_table_metadata(uri, options) == META
