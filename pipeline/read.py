"""Read stage: Parquet shards from a directory, glob or URL (local, s3://, any fsspec URL)."""

from __future__ import annotations

import glob as _glob

import pyarrow as pa
import pyarrow.parquet as pq
import ray

from pipeline.config import SourceConfig
from pipeline.storage import StorageConfig, url_path

_GLOB_CHARS = "*?["


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


def source_schema(source: SourceConfig, storage: StorageConfig) -> pa.Schema:
    """The schema of the first shard, checked for the columns the job needs."""
    first = list_files(source, storage)[0]
    fs = storage.fsspec_filesystem(first)
    with fs.open(url_path(first), "rb") as fh:
        schema = pq.read_schema(fh)
    missing = [c for c in source.columns if c not in schema.names]
    if missing:
        raise ValueError(f"input {source.input} lacks columns {missing}; it has {schema.names}")
    return schema


def read_source(
    source: SourceConfig, storage: StorageConfig, *, num_cpus: float, concurrency: int | None = None
) -> ray.data.Dataset:
    # Ray 2.60's Parquet datasource v2 adds a ListFiles task that always asks for a whole CPU: on a
    # small cluster it waits forever beside the encoder actors. The files are listed here anyway.
    ray.data.DataContext.get_current().use_datasource_v2 = False
    files = list_files(source, storage)
    ds = ray.data.read_parquet(
        files, filesystem=storage.pyarrow_filesystem(source.input), num_cpus=num_cpus, concurrency=concurrency
    )
    return ds.select_columns(source.columns)
