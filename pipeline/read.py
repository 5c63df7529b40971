"""Read stage: Parquet shards from a directory, glob or URL (local, s3://, any fsspec URL)."""

from __future__ import annotations

import functools
import glob as _glob
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline.config import SourceConfig
from pipeline.storage import StorageConfig, url_path

_GLOB_CHARS = "*?["
# Provenance of every row, carried to the rejected-rows table and used to order duplicate ids.
SOURCE_FILE = "_file"  # string: the file's URL (or local path), as `list_files` lists it
SOURCE_ROW = "_row"  # int64: the row's position in that file, from 0
FILE_ROWS = "_file_rows"  # int64: the file's row count from its footer, on its first row (0 elsewhere)
BLOCK_BYTES = 64 << 20  # uncompressed bytes per read block: well under Ray Data's 128 MiB target


def list_files(source: SourceConfig, storage: StorageConfig) -> list[str]:
    """Every Parquet file of the source, as full URLs (or local paths), sorted."""
    fs = storage.fsspec_filesystem(source.input)
    protocol = source.input.split("://", 1)[0] + "://" if "://" in source.input else ""
    path = url_path(source.input)
    if any(c in path for c in _GLOB_CHARS):
        found = fs.glob(path) if protocol else _glob.glob(path, recursive=True)
    elif fs.isdir(path):
        found = [f for f in fs.find(path) if f.endswith(".parquet")]
    elif fs.exists(path):
        found = [path]
    else:
        raise FileNotFoundError(f"input {source.input} does not exist")
    files = sorted(protocol + f.removeprefix(protocol) if protocol else f for f in found)
    if not files:
        raise FileNotFoundError(f"input {source.input} matches no Parquet files")
    return files


def source_schema(source: SourceConfig, storage: StorageConfig, files: list[str]) -> pa.Schema:
    """The schema of the first of `files` (from `list_files`), checked for the columns the job needs."""
    first = files[0]
    fs = storage.fsspec_filesystem(first)
    with fs.open(url_path(first), "rb") as fh:
        schema = pq.read_schema(fh)
    check_columns(f"input {source.input}", schema, source.columns)
    return schema


def check_columns(where: str, schema: pa.Schema, columns: list[str] | tuple[str, ...]) -> None:
    """Fail with the names a file lacks and the ones it has: a shard without the job's columns."""
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise ValueError(f"{where} lacks columns {missing}; it has {schema.names}")


class ParquetShards(Datasource):
    """The job's Parquet files as read tasks, one or more whole files each, streamed row group by row
    group in blocks of at most BLOCK_BYTES.

    `ray.data.read_parquet` first samples files in remote tasks to estimate encoding ratios, which
    blocks the job before any actor starts (2.5 s of a 2-core job's start-up, measured); the files
    are already listed here and their row groups are natural blocks, so nothing needs estimating.
    """

    def __init__(self, files: list[str], columns: tuple[str, ...], storage: StorageConfig):
        self.files, self.columns, self.storage = files, list(columns), storage

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None, data_context=None) -> list[ReadTask]:
        groups = [g for g in (self.files[k::max(1, parallelism)] for k in range(max(1, parallelism))) if g]
        return [
            ReadTask(functools.partial(_read_files, group, self.columns, self.storage),
                     BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=group),
                     per_task_row_limit=per_task_row_limit)
            for group in groups
        ]


def _read_files(files: list[str], columns: list[str], storage: StorageConfig) -> Iterator[pa.Table]:
    """Stream each file's row groups in blocks of about BLOCK_BYTES (row groups can hold millions of rows)."""
    fs = storage.fsspec_filesystem(files[0])
    for f in files:
        with fs.open(url_path(f), "rb") as fh:
            pf = pq.ParquetFile(fh)
            check_columns(f, pf.schema_arrow, columns)
            start = 0
            for g in range(pf.num_row_groups):
                meta = pf.metadata.row_group(g)
                rows = max(1, int(meta.num_rows * BLOCK_BYTES / max(meta.total_byte_size, 1)))
                for batch in pf.iter_batches(batch_size=rows, row_groups=[g], columns=columns):
                    n = batch.num_rows
                    footer = [pf.metadata.num_rows if start == 0 else 0] + [0] * (n - 1)
                    yield pa.Table.from_batches([batch]).append_column(
                        SOURCE_FILE, pa.array([f] * n, pa.string())).append_column(
                        SOURCE_ROW, pa.array(range(start, start + n), pa.int64())).append_column(
                        FILE_ROWS, pa.array(footer, pa.int64()))
                    start += n


def read_source(
    source: SourceConfig, storage: StorageConfig, files: list[str], *, num_cpus: float, concurrency: int | None = None
) -> ray.data.Dataset:
    """The source's id/text/title/kept columns of `files` (from `list_files`) as a Dataset, with each
    row's provenance (`SOURCE_FILE`, `SOURCE_ROW`)."""
    shards = ParquetShards(files, source.columns, storage)
    # One read task per file, its blocks as they come: Ray would otherwise split them into ~200
    # blocks to reach its default parallelism, each a task of its own downstream.
    return ray.data.read_datasource(shards, num_cpus=num_cpus, concurrency=concurrency, override_num_blocks=len(files))
