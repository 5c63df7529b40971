"""The read stage: every row of every row group, projected to the job's columns, in bounded blocks."""

from __future__ import annotations

import random
import re
import socket

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.read as read
from pipeline.config import SourceConfig
from pipeline.storage import StorageConfig, url_path


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released): the endpoint of a store that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def _bad_files(root) -> dict[str, str]:
    """A truncated copy of a good shard (its footer gone), random bytes, and one with corrupt pages mid-file."""
    _shard(root / "good.parquet", 0, 5000, row_group=1000)
    data = (root / "good.parquet").read_bytes()
    (root / "truncated.parquet").write_bytes(data[: len(data) // 2])
    (root / "random.parquet").write_bytes(random.Random(0).randbytes(3000))
    middle = len(data) // 2
    (root / "mid.parquet").write_bytes(data[:middle] + random.Random(1).randbytes(2000) + data[middle + 2000 :])
    return {name: str(root / f"{name}.parquet") for name in ("good", "truncated", "random", "mid")}


@pytest.mark.parametrize("name", ["truncated", "random"])
def test_an_unreadable_file_is_a_bad_file_named_with_its_cause(tmp_path, name):
    url = _bad_files(tmp_path)[name]
    with pytest.raises(read.BadFile) as err:
        list(read._read_files([url], ["id", "text"], StorageConfig()))
    assert err.value.url == url
    assert str(err.value) == (f"input file {url} is not a readable Parquet file (corrupt or truncated?): ArrowInvalid: "
                              "Parquet magic bytes not found in footer. Either the file is corrupted or this is not a "
                              "parquet file.; fix or remove it, or pass --on-bad-file skip to skip such files")


def test_a_file_that_breaks_after_rows_were_passed_on_is_no_skippable_bad_file(tmp_path, monkeypatch):
    url = _bad_files(tmp_path)["mid"]
    monkeypatch.setattr(read, "BLOCK_BYTES", 20_000)  # several blocks per row group: some pass before the break
    blocks = read._read_files([url], ["id", "text"], StorageConfig())
    assert next(blocks).num_rows > 0
    with pytest.raises(ValueError, match=rf"input file {url} broke after \d+ of its rows were read \(OSError: ") as err:
        list(blocks)
    assert not isinstance(err.value, read.BadFile)


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (pa.array([1, 2]), "has --text-column column 'text' of type int64, not a string, so every row would be "
                           "rejected; name a string column with --text-column"),
        (pa.array([1.5, 2.0]), "has --text-column column 'text' of type double, not a string, so every row would be "
                               "rejected; name a string column with --text-column"),
        (pa.array([["a"], ["b"]]), "has --text-column column 'text' of type list<element: string>, not a string, so "
                                   "every row would be rejected; name a string column with --text-column"),
    ],
)
def test_a_text_column_that_is_no_string_is_refused_before_any_row(tmp_path, column, message):
    pq.write_table(pa.table({"id": ["a", "b"], "text": column}), tmp_path / "x.parquet")
    source = SourceConfig(input=str(tmp_path))
    with pytest.raises(read.BadFile, match=re.escape(message)):
        list(read._read_files([str(tmp_path / "x.parquet")], source.columns, StorageConfig(), read.column_roles(source)))


@pytest.mark.parametrize("kind", [pa.string(), pa.large_string(), pa.binary(), pa.large_binary()])
def test_text_and_title_columns_of_strings_or_bytes_are_usable(tmp_path, kind):
    """Bytes pass the read as they are: the prepare stage decodes them row by row (invalid UTF-8 is a reject)."""
    values = ["a", "é"] if pa.types.is_string(kind) or pa.types.is_large_string(kind) else [b"a", b"\xff"]
    pq.write_table(pa.table({"id": ["a", "b"], "text": pa.array(values, kind), "title": pa.array(values, kind)}),
                   tmp_path / "x.parquet")
    source = SourceConfig(input=str(tmp_path), title_column="title")
    blocks = list(read._read_files([str(tmp_path / "x.parquet")], source.columns, StorageConfig(),
                                   read.column_roles(source)))
    assert [b["text"].type for b in blocks] == [kind] and blocks[0]["text"].to_pylist() == values


def test_integer_ids_are_usable(tmp_path):
    pq.write_table(pa.table({"id": pa.array([1, 2], pa.int32()), "text": ["a", "b"]}), tmp_path / "x.parquet")
    source = SourceConfig(input=str(tmp_path))
    blocks = read._read_files([str(tmp_path / "x.parquet")], source.columns, StorageConfig(), read.column_roles(source))
    assert sum(b.num_rows for b in blocks) == 2


def test_an_unreachable_store_fails_even_when_bad_files_are_skipped(moto_s3, ray_up):
    """Input on S3 with the endpoint down (a closed loopback port): one line naming the file, never a skip."""
    url = moto_s3.url("read-outage", "part-0.parquet")
    storage = StorageConfig.from_env(moto_s3.storage_options, env={})
    pq.write_table(pa.table({"id": ["a"], "text": ["b"]}), url_path(url), filesystem=storage.pyarrow_filesystem(url))
    down = StorageConfig.from_env({**moto_s3.storage_options, "endpoint": f"http://127.0.0.1:{closed_port()}"}, env={})
    recorder = read.SkippedFiles.remote()
    with pytest.raises(ValueError) as err:
        list(read._read_files([url], ["id", "text"], down, skipped=recorder))
    assert str(err.value).startswith(f"input file {url} could not be read from storage (EndpointConnectionError: ")
    assert str(err.value).endswith("; check the endpoint, the credentials and --storage-option")
    assert read.skipped_files(recorder) == []


def test_skipped_files_are_recorded_and_good_files_read_whole(tmp_path, ray_up):
    files = _bad_files(tmp_path)
    recorder = read.SkippedFiles.remote()
    blocks = list(read._read_files([files["random"], files["good"], files["truncated"]], ["id", "text"],
                                   StorageConfig(), skipped=recorder))
    assert sum(b.num_rows for b in blocks) == 5000
    listed = read.skipped_files(recorder)
    assert [s["file"] for s in listed] == sorted([files["random"], files["truncated"]])
    assert all(s["reason"].startswith("is not a readable Parquet file (corrupt or truncated?): ArrowInvalid") for s in listed)
