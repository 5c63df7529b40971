"""The read stage: every row of every row group, projected to the job's columns, in bounded blocks."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.read as read
from pipeline.config import SourceConfig
from pipeline.storage import StorageConfig


def _shard(path, start: int, rows: int, row_group: int) -> None:
    ids = [f"d{i}" for i in range(start, start + rows)]
    table = pa.table({"id": ids, "text": [f"text of {i}" for i in ids], "extra": list(range(rows))})
    pq.write_table(table, path, row_group_size=row_group)


def test_every_row_group_of_every_file_is_read_with_only_the_job_columns(tmp_path, ray_up):
    _shard(tmp_path / "a.parquet", 0, 25, row_group=10)  # 3 row groups
    _shard(tmp_path / "b.parquet", 25, 7, row_group=100)
    source, storage = SourceConfig(input=str(tmp_path)), StorageConfig()
    ds = read.read_source(source, storage, read.list_files(source, storage), num_cpus=0.25, concurrency=2)
    table = pa.concat_tables(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    assert table.column_names == ["id", "text", read.SOURCE_FILE, read.SOURCE_ROW, read.FILE_ROWS]
    assert sorted(n for n in table[read.FILE_ROWS].to_pylist() if n) == [7, 25]  # each footer's count, once
    assert sorted(table["id"].to_pylist(), key=lambda s: int(s[1:])) == [f"d{i}" for i in range(32)]
    assert dict(zip(table["id"].to_pylist(), table["text"].to_pylist(), strict=True))["d24"] == "text of d24"
    # Provenance: each row's file and its position there, across row groups.
    where = {i: (f, r) for i, f, r in zip(*(table[c].to_pylist() for c in ("id", read.SOURCE_FILE, read.SOURCE_ROW)),
                                          strict=True)}
    assert where["d0"] == (str(tmp_path / "a.parquet"), 0) and where["d24"] == (str(tmp_path / "a.parquet"), 24)
    assert where["d25"] == (str(tmp_path / "b.parquet"), 0) and where["d31"] == (str(tmp_path / "b.parquet"), 6)


def test_large_row_groups_stream_in_bounded_blocks(tmp_path, monkeypatch):
    _shard(tmp_path / "a.parquet", 0, 1000, row_group=1000)
    monkeypatch.setattr(read, "BLOCK_BYTES", 2000)  # ~1/20 of the row group's uncompressed size
    blocks = list(read._read_files([str(tmp_path / "a.parquet")], ["id", "text"], StorageConfig()))
    assert len(blocks) > 10 and sum(b.num_rows for b in blocks) == 1000
    assert pa.concat_tables(blocks)["id"].to_pylist() == [f"d{i}" for i in range(1000)]


def test_a_shard_without_the_job_columns_is_named(tmp_path):
    pq.write_table(pa.table({"id": ["x"], "body": ["no text column"]}), tmp_path / "odd.parquet")
    with pytest.raises(ValueError, match=r"odd\.parquet lacks columns \['text'\]"):
        list(read._read_files([str(tmp_path / "odd.parquet")], ["id", "text"], StorageConfig()))
