"""Duplicate ids within a run: the first occurrence in (file, row) order is embedded, every later one is
rejected as `duplicate_id`, and the driver never holds the set of ids.

Before the job, read tasks write every source row's (id, file, row) as Lance fragments of a staging
dataset `<table>.staging/<job_key>-ids.lance` (id column only: a cheap columnar read), the driver
commits them and builds a BTREE index on `id`. Prepare tasks then look their block's ids up in it
(`duplicates`), the same indexed lookup join as the table diff (`pipeline.diff`): a row is a duplicate
when an occurrence of its id sits at an earlier (file, row). Files sort as `list_files` lists them,
so "earlier" is the order a reader of the corpus sees. The staging dataset is removed after the run.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import lance
import pyarrow as pa
import pyarrow.compute as pc
from lance import LanceOperation
from lance.fragment import FragmentMetadata, write_fragments

from pipeline.diff import LookupSpec, has_id_index, opened
from pipeline.lance_commit import commit_once, retry_io
from pipeline.read import SOURCE_FILE, SOURCE_ROW, ParquetShards
from pipeline.storage import StorageConfig, url_path

if TYPE_CHECKING:
    pass

IDS_SCHEMA = pa.schema([("id", pa.string()), ("file", pa.string()), ("row", pa.int64())])
DUPLICATE = "duplicate_id"


class _IdWriter:
    """Ray `map_batches` callable: a block's (id, file, row) as uncommitted fragments of the ids dataset."""

    def __init__(self, uri: str, id_column: str, storage_options: dict[str, str]):
        self.uri, self.id_column, self.storage_options = uri, id_column, storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch[self.id_column]
        keep = pc.is_valid(ids)  # a missing id is rejected as such, never a duplicate
        rows = pa.table({"id": pc.cast(ids, pa.string()), "file": batch[SOURCE_FILE], "row": batch[SOURCE_ROW]},
                        schema=IDS_SCHEMA).filter(keep)
        fragments = write_fragments(rows, self.uri, schema=IDS_SCHEMA, mode="overwrite",
                                    storage_options=self.storage_options) if rows.num_rows else []
        return pa.table({"fragments": [json.dumps([f.to_json() for f in fragments])]})


def index_source_ids(files: list[str], id_column: str, storage: StorageConfig, uri: str, *,
                     num_cpus: float, concurrency: int, run_id: str, skipped=None) -> LookupSpec:
    """Write and index every (id, file, row) of `files` at `uri`; returns what prepare tasks look up."""
    import ray.data

    remove_ids(uri, storage)  # a previous attempt's leftovers
    options = storage.lance_options()
    shards = ParquetShards(files, (id_column,), storage, roles={id_column: "--id-column"}, skipped=skipped)
    reads = ray.data.read_datasource(shards, num_cpus=num_cpus,
                                     concurrency=concurrency, override_num_blocks=len(files))
    written = reads.map_batches(_IdWriter(uri, id_column, options), batch_format="pyarrow", num_cpus=num_cpus,
                                compute=ray.data.TaskPoolStrategy(size=concurrency))
    fragments: list[FragmentMetadata] = []
    for batch in written.iter_batches(batch_format="pyarrow", batch_size=None):
        for cell in batch["fragments"].to_pylist():
            fragments += [FragmentMetadata.from_json(json.dumps(d)) for d in json.loads(cell)]
    ds = commit_once(uri, lance.Transaction(0, LanceOperation.Overwrite(IDS_SCHEMA, fragments)), options)
    if ds.count_rows():
        retry_io(lambda: ds.create_scalar_index("id", "BTREE"), lambda: has_id_index(uri, options))
    return LookupSpec(uri, lance.dataset(uri, storage_options=options).version, tuple(sorted(options.items())), run_id)


def remove_ids(uri: str, storage: StorageConfig) -> None:
    fs = storage.fsspec_filesystem(uri)
    if fs.exists(url_path(uri)):
        fs.rm(url_path(uri), recursive=True)


def duplicates(spec: LookupSpec, ids: list[str], files: list[str], rows: list[int]) -> list[bool]:
    """For each (id, file, row): is there an occurrence of the id at an earlier (file, row)?"""
    if not ids:
        return []
    found = opened(spec).to_table(columns=["id", "file", "row"], filter=pc.field("id").isin(sorted(set(ids))))
    first: dict[str, tuple[str, int]] = {}
    for i, f, r in zip(found["id"].to_pylist(), found["file"].to_pylist(), found["row"].to_pylist(), strict=True):
        if i not in first or (f, r) < first[i]:
            first[i] = (f, r)
    return [first.get(i, (f, r)) < (f, r) for i, f, r in zip(ids, files, rows, strict=True)]
